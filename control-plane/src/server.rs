//! Wires the control plane together and serves until shutdown.

use std::sync::Arc;
use std::time::Duration;

use aviary_certs::TlsFiles;
use aviary_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::api::{
    AuditApi, ConfigsApi, EnrollmentApi, IdentitiesApi, NodesApi, Pager, ReleasesApi, Requests,
    RolloutsApi,
};
use crate::auth::AuthLayer;
use crate::authority::Authority;
use crate::authority::EnrollSettings;
use crate::blobs::Blobs;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::connections::Connections;
use crate::deltas::Deltas;
use crate::error::ControlPlaneError;
use crate::fleet::{Fleet, FleetService};
use crate::journal::Journal;
use crate::listener::accept_loop;
use crate::registry::Registry;
use crate::store::{SledStore, Store};

/// Open connections one admin certificate may hold (operators run many tools at once).
const MAX_CONNECTIONS_PER_ADMIN: usize = 256;
/// Admin requests are small; anything bigger is a mistake or an attack.
const MAX_ADMIN_MESSAGE_BYTES: usize = 1 << 20;
/// An Enroll request: a node id, a CSR (at most 4 KiB), a token and a few labels.
const MAX_ENROLL_MESSAGE_BYTES: usize = 16 << 10;
/// Upload messages carry chunks (the CLI sends 1 MiB) or an attachment (up to 3 MiB).
const RELEASE_MESSAGE_BYTES: usize = 4 << 20;

/// Serves until `shutdown` is cancelled, then drains: fleet streams end with UNAVAILABLE
/// (edges reconnect elsewhere), in-flight calls finish, statuses are flushed.
/// `ready` receives the bound gRPC address once the port is open.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), ControlPlaneError> {
    let files = TlsFiles {
        ca: config.certs.join("ca.pem"),
        cert: config.certs.join("control-plane.pem"),
        key: config.certs.join("control-plane.key"),
    };
    let trust_domain = aviary_certs::trust_domain_of(&files.ca)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ControlPlaneError::Io {
        context: format!("--data-dir {}", config.data_dir.display()),
        source,
    })?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&config.data_dir)?);
    let ttl = u32::try_from(config.weight_ttl.as_secs()).unwrap_or(u32::MAX);
    let journal = Arc::new(Journal::new(store.clone()));
    let registry = Arc::new(Registry::open(journal.clone(), ttl).await?);
    let blobs_dir = config.data_dir.join("blobs");
    let blobs = Blobs::open(&blobs_dir).map_err(|source| ControlPlaneError::Io {
        context: format!("blob store {}", blobs_dir.display()),
        source,
    })?;
    // The public half only: the control plane checks signatures, it never makes them.
    let trusted = aviary_certs::TrustedKeys::load(&config.certs)?;
    if trusted.is_empty() {
        tracing::warn!(
            certs = %config.certs.display(),
            "no release-signing.pub: every release upload will be refused"
        );
    }
    let catalog = Arc::new(Catalog::new(
        journal.clone(),
        blobs,
        trusted,
        config.max_release_bytes,
    ));
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControlPlaneError::Io {
                context: format!("--listen {}", config.listen),
                source,
            })?;
    let local = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Io {
            context: "local address".into(),
            source,
        })?;
    tracing::info!(listen = %local, trust_domain, "control plane serving");

    let (conn_tx, conn_rx) = mpsc::channel(1024);
    let authority = Authority::open(
        &config.certs,
        revoked_at_handshake(&registry, &trust_domain),
    )?;
    let reloader = tokio::spawn(tracing::Instrument::instrument(
        crate::authority::watch_files(authority.clone(), journal.clone(), shutdown.clone()),
        tracing::info_span!("cert_reload"),
    ));
    let connections = Connections::new(config.max_connections_per_node, MAX_CONNECTIONS_PER_ADMIN);
    let accept = tokio::spawn(accept_loop(
        listener,
        authority.clone(),
        trust_domain,
        journal.clone(),
        connections.clone(),
        conn_tx,
        shutdown.clone(),
    ));
    let flusher = tokio::spawn(tracing::Instrument::instrument(
        flush_statuses(registry.clone(), shutdown.clone()),
        tracing::info_span!("status_flush"),
    ));
    let engine = tokio::spawn(tracing::Instrument::instrument(
        crate::rollout::run(registry.clone(), shutdown.clone()),
        tracing::info_span!("rollout_engine"),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    metrics::gauge!("aviary_store_healthy").set(1.0);
    let pruner = tokio::spawn(tracing::Instrument::instrument(
        prune_audit(store.clone(), config.audit_retention, shutdown.clone()),
        tracing::info_span!("audit_retention"),
    ));
    let store_watch = tokio::spawn(tracing::Instrument::instrument(
        watch_store(store.clone(), health.clone(), shutdown.clone()),
        tracing::info_span!("store_watch"),
    ));
    let secret = {
        let store = store.clone();
        crate::journal::blocking(move || store.secret("page-token")).await??
    };
    let pager = Arc::new(Pager::new(&secret));
    let requests = Arc::new(Requests::new(journal.clone()));
    let (reflection_v1alpha, reflection_v1) =
        aviary_startup::reflection().map_err(ControlPlaneError::Unavailable)?;

    let deltas = Arc::new(Deltas::open(
        catalog.blobs().clone(),
        &config.data_dir.join("payloads"),
        config.deltas.clone(),
    )?);
    let enroll = Arc::new(EnrollSettings {
        authority: authority.clone(),
        ttl: config.node_cert_ttl,
        rate: config.enroll_rate,
    });
    let fleet = Fleet::new(
        registry.clone(),
        journal.clone(),
        catalog.clone(),
        deltas,
        config.fleet.clone(),
        enroll.clone(),
        shutdown.clone(),
    );
    let nodes = pb::nodes_server::NodesServer::new(NodesApi::new(
        registry.clone(),
        connections.clone(),
        pager.clone(),
        requests.clone(),
        shutdown.clone(),
    ))
    .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES);
    let audit = pb::audit_server::AuditServer::new(AuditApi::new(
        journal.clone(),
        pager.clone(),
        shutdown.clone(),
    ))
    .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES);

    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let serve = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive * 2))
        .layer(crate::limits::MessageLimitsLayer)
        .layer(AuthLayer::new(registry.clone(), journal.clone()))
        .add_service(FleetService::new(fleet))
        .add_service(nodes)
        .add_service(audit)
        .add_service(
            pb::releases_server::ReleasesServer::new(ReleasesApi::new(
                catalog.clone(),
                pager.clone(),
            ))
            .max_decoding_message_size(RELEASE_MESSAGE_BYTES),
        )
        .add_service(
            pb::rollouts_server::RolloutsServer::new(RolloutsApi::new(
                registry.clone(),
                catalog.clone(),
                pager.clone(),
                requests.clone(),
            ))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
        )
        .add_service(
            pb::configs_server::ConfigsServer::new(ConfigsApi::new(
                registry.clone(),
                catalog.clone(),
                pager.clone(),
                requests,
            ))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
        )
        .add_service(
            pb::enrollment_server::EnrollmentServer::new(EnrollmentApi::new(
                registry.clone(),
                enroll,
            ))
            .max_decoding_message_size(MAX_ENROLL_MESSAGE_BYTES),
        )
        .add_service(
            pb::identities_server::IdentitiesServer::new(IdentitiesApi::new(
                registry.clone(),
                authority.clone(),
            ))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
        )
        .add_service(health_service)
        .add_service(reflection_v1alpha)
        .add_service(reflection_v1)
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), shutdown.cancelled());
    let result = serve.await;
    accept.abort();
    let _ = flusher.await;
    let _ = engine.await;
    let _ = store_watch.await;
    let _ = pruner.await;
    let _ = reloader.await;
    registry.flush_statuses(true).await?;
    tracing::info!("control plane stopped");
    result.map_err(Into::into)
}

/// Fails the TLS handshake of a revoked node's certificate, whichever serial it is: a
/// revoked node never reaches HTTP/2 again (the handshake refusal is audited).
fn revoked_at_handshake(registry: &Arc<Registry>, trust_domain: &str) -> aviary_certs::Refuse {
    use crate::auth::Revocations;
    let registry = registry.clone();
    let trust_domain = trust_domain.to_owned();
    Arc::new(
        move |der: &[u8]| match aviary_certs::Identity::from_cert_der(der, &trust_domain) {
            Ok(aviary_certs::Identity::Edge(id)) if registry.is_revoked(&id) => {
                Some(format!("node {id} is revoked"))
            }
            _ => None,
        },
    )
}

/// Keeps the audit log within its retention, and forgets request ids past theirs: once
/// a minute, in batches.
async fn prune_audit(
    store: Arc<dyn Store>,
    retention: crate::config::AuditRetention,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::audit::now_ms();
        let before_ms =
            now.saturating_sub(u64::try_from(retention.age.as_millis()).unwrap_or(u64::MAX));
        let requests = store.clone();
        let forgotten = tokio::task::spawn_blocking(move || {
            requests.prune_requests(now.saturating_sub(crate::requests::RETENTION_MS))
        })
        .await;
        if let Ok(Err(e)) = forgotten {
            tracing::warn!(error = %e, "could not forget old request ids");
        }
        loop {
            let store = store.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                store.prune_events(retention.events, before_ms, 10_000)
            })
            .await;
            match pruned {
                Ok(Ok(n)) => {
                    metrics::counter!("aviary_audit_events_pruned_total").increment(n as u64);
                    if n < 10_000 {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not prune the audit log");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Every service health reports on ("" is the server as a whole).
const SERVICES: [&str; 9] = [
    "aviary.v1.Fleet",
    "aviary.v1.Enrollment",
    "aviary.v1.Identities",
    "aviary.v1.Nodes",
    "aviary.v1.Audit",
    "aviary.v1.Releases",
    "aviary.v1.Rollouts",
    "aviary.v1.Configs",
    "",
];

/// Reports NOT_SERVING while the store cannot write, and probes it until it can again
/// (a disk that was full or read-only recovers without a restart).
async fn watch_store(
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut serving = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut healthy = store.healthy();
        if !healthy {
            let probing = store.clone();
            healthy = tokio::task::spawn_blocking(move || probing.probe())
                .await
                .is_ok_and(|r| r.is_ok());
        }
        if healthy == serving {
            continue;
        }
        serving = healthy;
        let status = if healthy {
            tracing::info!("store writes work again: serving");
            tonic_health::ServingStatus::Serving
        } else {
            tracing::warn!("store cannot write: NOT_SERVING until it can");
            tonic_health::ServingStatus::NotServing
        };
        metrics::gauge!("aviary_store_healthy").set(if healthy { 1.0 } else { 0.0 });
        for name in SERVICES {
            health.set_service_status(name, status).await;
        }
    }
}

/// Node statuses every second; health reports alone every `HEALTH_FLUSH_TICKS` seconds
/// (they are for `GetNode` after a restart: analysis keeps its own history in memory).
async fn flush_statuses(registry: Arc<Registry>, shutdown: CancellationToken) {
    const HEALTH_FLUSH_TICKS: u64 = 30;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if let Err(e) = registry
            .flush_statuses(n.is_multiple_of(HEALTH_FLUSH_TICKS))
            .await
        {
            tracing::warn!(error = %e, "could not persist node statuses");
        }
    }
}
