//! The edge side of the fleet stream: connect, Hello, apply and answer each desired-state
//! message with ACK or NACK, and reconnect with full-jitter backoff when the stream ends.
//! The backoff resets only once the control plane has answered (response headers arrive
//! after it accepted the Hello), so a control plane that refuses us is not hammered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aviary_proto::v1 as pb;
use pb::control_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::link::Link;
use crate::weights::{Assignment, Weights};
use crate::EdgeError;

/// How often a connected daemon records contact in `state.json`.
const TOUCH_INTERVAL: Duration = Duration::from_secs(10);

/// Who this daemon is, for the Hello.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) node_id: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) arch: String,
}

/// Keeps a fleet stream up until `shutdown`.
pub(crate) async fn run(
    link: Link,
    identity: Identity,
    weights: Arc<Weights>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => break,
            outcome = stream_once(&link, &identity, &weights, &mut backoff) => outcome,
        };
        if let Err(e) = set_connected(&weights, false).await {
            tracing::error!(error = %e, "could not record disconnect");
        }
        match outcome {
            Ok(()) => tracing::info!("fleet stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "fleet stream failed; reconnecting"),
        }
        metrics::counter!("aviary_edge_reconnects_total").increment(1);
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    let _ = set_connected(&weights, false).await;
}

async fn set_connected(weights: &Arc<Weights>, connected: bool) -> Result<(), EdgeError> {
    let weights = weights.clone();
    blocking(move || weights.set_connected(connected)).await
}

/// Runs file I/O with fsync off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EdgeError> + Send + 'static,
) -> Result<T, EdgeError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(EdgeError::InvalidAssignment(format!(
            "state task failed: {e}"
        )))
    })
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Edge(#[from] EdgeError),
    #[error("control plane: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("outbound stream closed")]
    Closed,
}

async fn stream_once(
    link: &Link,
    identity: &Identity,
    weights: &Arc<Weights>,
    backoff: &mut Backoff,
) -> Result<(), StreamError> {
    let channel = link.connect().await?;
    let mut client =
        pb::fleet_client::FleetClient::new(channel).max_decoding_message_size(16 << 20);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node_id: identity.node_id.clone(),
        labels: identity.labels.clone().into_iter().collect(),
        arch: identity.arch.clone(),
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        modules: Vec::new(),
        applied: vec![pb::AppliedRevision {
            resource: "weights".into(),
            revision: weights.applied_revision(),
        }],
        partial_transfers: Vec::new(),
    };
    send(&tx, pb::edge_message::Kind::Hello(hello)).await?;
    let response = client.connect(ReceiverStream::new(rx)).await?;
    backoff.reset();
    set_connected(weights, true).await?;
    tracing::info!("fleet stream up");
    metrics::gauge!("aviary_edge_connected").set(1.0);
    let mut inbound = response.into_inner();
    let mut touch = tokio::time::interval(TOUCH_INTERVAL);
    touch.tick().await;
    let result = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => handle(msg, weights, &tx).await?,
                Ok(None) => break Ok(()),
                Err(status) => break Err(status.into()),
            },
            _ = touch.tick() => {
                let w = weights.clone();
                blocking(move || w.touch()).await?;
            }
        }
    };
    metrics::gauge!("aviary_edge_connected").set(0.0);
    result
}

async fn send(
    tx: &mpsc::Sender<pb::EdgeMessage>,
    kind: pb::edge_message::Kind,
) -> Result<(), StreamError> {
    tx.send(pb::EdgeMessage { kind: Some(kind) })
        .await
        .map_err(|_| StreamError::Closed)
}

async fn handle(
    msg: pb::ControlMessage,
    weights: &Arc<Weights>,
    tx: &mpsc::Sender<pb::EdgeMessage>,
) -> Result<(), StreamError> {
    let nonce = msg.nonce;
    match msg.kind {
        Some(Kind::Weights(assignment)) => {
            let revision = assignment.revision;
            let assignment = Assignment {
                revision,
                weights: assignment.weights.into_iter().collect(),
                ttl_seconds: assignment.ttl_seconds,
            };
            let w = weights.clone();
            match blocking(move || w.apply(assignment)).await {
                Ok(()) => {
                    tracing::info!(revision, weights = ?weights.snapshot().view.weights, "weights applied");
                    metrics::gauge!("aviary_edge_weights_revision").set(revision as f64);
                    send(
                        &tx.clone(),
                        pb::edge_message::Kind::Ack(pb::Ack { nonce, revision }),
                    )
                    .await
                }
                Err(e) => {
                    tracing::warn!(revision, error = %e, "weights refused");
                    metrics::counter!("aviary_edge_nacks_total").increment(1);
                    let error = e.to_string();
                    send(
                        tx,
                        pb::edge_message::Kind::Nack(pb::Nack {
                            nonce,
                            revision,
                            error,
                        }),
                    )
                    .await
                }
            }
        }
        Some(Kind::ModuleUpdate(update)) => {
            let error = "module updates are not supported by this daemon version".to_owned();
            let revision = update.revision;
            send(
                tx,
                pb::edge_message::Kind::Nack(pb::Nack {
                    nonce,
                    revision,
                    error,
                }),
            )
            .await
        }
        Some(Kind::Chunk(_)) | Some(Kind::AbortTransfer(_)) | None => Ok(()),
    }
}
