//! The IMU sensor stub (`aviary.sensors.v1.SensorStub`): replayed recordings, seeded
//! synthetic signals or bridged samples, paced per subscriber, with injectable faults.
//!
//! Data flow: a request becomes a [`source::SampleStream`] (where samples come from),
//! which the [`pacer`] thread pushes into a [`subscriber`] queue at each sample's due
//! time (or which the client pulls directly at speed 0); the [`hub`] knows every open
//! subscription and fans bridged samples out.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod faults;
pub mod hub;
pub mod pacer;
pub mod recording;
pub mod rng;
pub mod service;
pub mod source;
pub mod subscriber;
pub mod synthetic;
pub mod telemetry;
pub mod transport;
pub mod units;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use aviary_proto::sensors::v1 as pb;
pub use config::{Args, Config};
pub use error::SensorError;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long in-flight calls get to end after shutdown before the stub stops anyway (a
/// client that stopped reading cannot be flushed).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` is cancelled: then every stream ends with UNAVAILABLE and the
/// server drains. `ready` receives the bound address once the port is open.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), SensorError> {
    let tls = match &config.certs {
        Some(dir) => Some(Arc::new(aviary_certs::server_config(
            &aviary_certs::TlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("control-plane.pem"),
                key: dir.join("control-plane.key"),
            },
        )?)),
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| SensorError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| SensorError::Bind {
        addr: config.listen,
        source,
    })?;
    let config = Arc::new(config);
    let hub = Arc::new(hub::Hub::new(config.subscriber_timeout));
    let pacer = Arc::new(pacer::Pacer::start(hub.clone()).map_err(SensorError::Pacer)?);
    tracing::info!(
        listen = %local,
        mode = config.sensors.mode().as_str(),
        sensors = ?config.sensors.ids(),
        speed = config.speed,
        tls = tls.is_some(),
        "sensor stub serving"
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["aviary.sensors.v1.SensorStub", ""] {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let (reflection_v1alpha, reflection_v1) =
        aviary_startup::reflection().map_err(SensorError::Reflection)?;

    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    let accept = tokio::spawn(transport::accept_loop(
        listener,
        tls,
        conn_tx,
        shutdown.clone(),
    ));
    let gauge = tokio::spawn(refresh_gauge(hub.clone(), shutdown.clone()));
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let api = service::SensorStubApi::new(config.clone(), hub.clone(), pacer.clone());
    let serve = tonic::transport::Server::builder()
        // A rig that loses power must not hold a subscriber slot forever.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(pb::sensor_stub_server::SensorStubServer::new(api))
        .add_service(health_service)
        .add_service(reflection_v1alpha)
        .add_service(reflection_v1)
        .serve_with_incoming_shutdown(
            ReceiverStream::new(conn_rx),
            shutdown.clone().cancelled_owned(),
        );
    // Its own task, not tonic's shutdown future: when the accept loop stops first, tonic
    // drains on the end of its incoming stream and never polls that future, and streams
    // that are never ended would hold the drain open.
    let closer = tokio::spawn({
        let shutdown = shutdown.clone();
        let hub = hub.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: ending every stream");
            hub.close_all("sensor stub shutting down");
        }
    });
    let result = tokio::select! {
        r = serve => r.map_err(SensorError::from),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!(open = hub.len(), "clients did not finish within the drain timeout");
            Ok(())
        }
    };
    accept.abort();
    gauge.abort();
    closer.abort();
    tracing::info!("sensor stub stopped");
    result
}

/// Keeps `aviary_sensor_subscribers` fresh (gauges idle for 30 s expire).
async fn refresh_gauge(hub: Arc<hub::Hub>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => metrics::gauge!("aviary_sensor_subscribers").set(hub.len() as f64),
        }
    }
}
