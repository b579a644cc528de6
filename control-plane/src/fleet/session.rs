//! One fleet stream, from Hello to its end: the xDS-style send / ACK / NACK state machine.
//!
//! * The first message must be a Hello naming the node id of the client certificate.
//! * The node's desired weights are sent when they differ from what the Hello says is
//!   applied, then on every change. Each send carries a fresh stream-local nonce.
//! * An ACK or NACK counts only if it carries the nonce of the latest send; others are
//!   stale and ignored. A NACKed revision is parked: not sent again on this or any later
//!   stream until the desired state moves to another revision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aviary_certs::Identity;
use aviary_proto::v1 as pb;
use pb::edge_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::codec::ControlFrame;
use super::Fleet;
use crate::audit::NewEvent;
use crate::limits::oversized;
use crate::listener::PeerInfo;
use crate::node::ModuleRecord;
use crate::registry::{Attachment, Desired, HelloInfo};
use crate::selector::validate_label;

/// Resource name of the weights in `Hello.applied`.
const WEIGHTS: &str = "weights";

type Outbound = mpsc::Sender<Result<ControlFrame, Status>>;

/// Admits a new stream, reads its Hello, and starts its session task.
pub(super) async fn open(
    fleet: Arc<Fleet>,
    request: Request<Streaming<pb::EdgeMessage>>,
) -> Result<Response<ReceiverStream<Result<ControlFrame, Status>>>, Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client identity"))?;
    let Identity::Edge(node_id) = peer.identity.clone() else {
        return Err(Status::permission_denied("edge certificates only"));
    };
    if !fleet.admission.try_take() {
        metrics::counter!("aviary_streams_shed_total").increment(1);
        return Err(Status::unavailable(
            "control plane is admitting streams gradually; retry with backoff",
        ));
    }
    metrics::counter!("aviary_streams_admitted_total").increment(1);

    let mut inbound = request.into_inner();
    let first = tokio::time::timeout(fleet.settings.hello_timeout, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello within the hello timeout"))?
        .map_err(oversized)?;
    let hello = match first.and_then(|m| m.kind) {
        Some(Kind::Hello(hello)) => hello,
        _ => {
            return Err(Status::invalid_argument(
                "the first message must be a Hello",
            ))
        }
    };
    if hello.node_id != node_id {
        let reason = format!(
            "Hello names node {:?} but the certificate is for {node_id:?}",
            hello.node_id
        );
        let event = NewEvent::new(
            peer.identity.to_string(),
            "auth.denied",
            format!("node/{node_id}"),
            reason.clone(),
        );
        if let Err(e) = fleet.registry.audit(event, false).await {
            tracing::warn!(error = %e, "could not audit refused hello");
        }
        return Err(Status::permission_denied(reason));
    }
    let applied = hello
        .applied
        .iter()
        .find(|a| a.resource == WEIGHTS)
        .map_or(0, |a| a.revision);
    let mut info = hello_info(hello)?;
    info.applied_weights = applied;
    let attachment = fleet.registry.attach(&node_id, info).await?;

    let (tx, rx) = mpsc::channel(4);
    let span = tracing::info_span!("fleet_stream", node_id = %node_id, peer = %peer.addr);
    tokio::spawn(tracing::Instrument::instrument(
        run(fleet, node_id, attachment, inbound, tx, applied),
        span,
    ));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Validates a Hello into what the registry stores (proto types stop here).
fn hello_info(hello: pb::Hello) -> Result<HelloInfo, Status> {
    if hello.labels.len() > 64 {
        return Err(Status::invalid_argument("at most 64 labels per node"));
    }
    for (k, v) in &hello.labels {
        validate_label(k, v)?;
    }
    if hello.modules.len() > 256 {
        return Err(Status::invalid_argument("at most 256 modules per node"));
    }
    let short = |what: &str, s: &str| {
        if s.len() > 128 {
            Err(Status::invalid_argument(format!(
                "{what} longer than 128 bytes"
            )))
        } else {
            Ok(())
        }
    };
    short("arch", &hello.arch)?;
    short("daemon_version", &hello.daemon_version)?;
    let mut modules = Vec::with_capacity(hello.modules.len());
    for m in hello.modules {
        for (what, s) in [
            ("module name", &m.name),
            ("version", &m.version),
            ("sha256", &m.sha256),
            ("slot", &m.slot),
        ] {
            short(what, s)?;
        }
        modules.push(ModuleRecord {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            state: m.state,
            slot: m.slot,
        });
    }
    Ok(HelloInfo {
        labels: hello.labels.into_iter().collect(),
        arch: hello.arch,
        daemon_version: hello.daemon_version,
        modules,
        applied_weights: 0,
    })
}

/// The latest desired-state message sent and not yet answered.
struct Outstanding {
    nonce: String,
    revision: u64,
    committed_at: Instant,
}

struct Session {
    fleet: Arc<Fleet>,
    node_id: String,
    tx: Outbound,
    next_nonce: u64,
    outstanding: Option<Outstanding>,
    parked: Option<u64>,
    last_sent: Option<u64>,
}

impl Session {
    /// Sends `desired` unless the node has it or refused it.
    async fn offer(&mut self, desired: &Desired, applied: Option<u64>) -> Result<(), ()> {
        if Some(desired.revision) == self.parked
            || Some(desired.revision) == self.last_sent
            || Some(desired.revision) == applied
        {
            return Ok(());
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let frame = ControlFrame {
            nonce: nonce.clone(),
            body: desired.message.clone(),
        };
        match tokio::time::timeout(self.fleet.settings.send_timeout, self.tx.send(Ok(frame))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(()),
            Err(_) => {
                tracing::warn!("peer does not read its stream; dropping it");
                return Err(());
            }
        }
        metrics::counter!("aviary_weight_assignments_sent_total").increment(1);
        self.last_sent = Some(desired.revision);
        self.outstanding = Some(Outstanding {
            nonce,
            revision: desired.revision,
            committed_at: desired.committed_at,
        });
        Ok(())
    }

    /// Handles one message from the edge; `Err` ends the stream with that status.
    async fn on_message(&mut self, msg: pb::EdgeMessage) -> Result<(), Status> {
        match msg.kind {
            Some(Kind::Ack(ack)) => {
                let Some(out) = self.take_outstanding(&ack.nonce) else {
                    return Ok(());
                };
                self.fleet.registry.record_ack(&self.node_id, out.revision);
                metrics::counter!("aviary_acks_total").increment(1);
                metrics::histogram!("aviary_propagation_seconds")
                    .record(out.committed_at.elapsed().as_secs_f64());
                tracing::debug!(revision = out.revision, "ack");
            }
            Some(Kind::Nack(nack)) => {
                let Some(out) = self.take_outstanding(&nack.nonce) else {
                    return Ok(());
                };
                let error: String = nack.error.chars().take(1024).collect();
                self.parked = Some(out.revision);
                self.fleet
                    .registry
                    .record_nack(&self.node_id, out.revision, &error);
                metrics::counter!("aviary_nacks_total").increment(1);
                tracing::info!(revision = out.revision, %error, "nack: revision parked");
                let event = NewEvent::new(
                    format!("edge/{}", self.node_id),
                    "fleet.nack",
                    format!("node/{}", self.node_id),
                    format!("revision {} refused: {error}", out.revision),
                );
                if let Err(e) = self.fleet.registry.audit(event, false).await {
                    tracing::warn!(error = %e, "could not audit nack");
                }
            }
            Some(Kind::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello is allowed only as the first message",
                ));
            }
            // Health and transfer progress are consumed by the rollout engine (issues 3, 4).
            Some(Kind::Health(_)) | Some(Kind::Progress(_)) => {}
            None => return Err(Status::invalid_argument("EdgeMessage without a kind")),
        }
        Ok(())
    }

    fn take_outstanding(&mut self, nonce: &str) -> Option<Outstanding> {
        if self.outstanding.as_ref().is_some_and(|o| o.nonce == nonce) {
            self.outstanding.take()
        } else {
            metrics::counter!("aviary_stale_answers_total").increment(1);
            tracing::debug!(nonce, "answer with a stale nonce ignored");
            None
        }
    }
}

/// ±10% around `age`, so streams opened together do not all end together.
fn jittered(age: Duration) -> Duration {
    age.mul_f64(0.9 + 0.2 * fastrand::f64())
}

async fn run(
    fleet: Arc<Fleet>,
    node_id: String,
    attachment: Attachment,
    mut inbound: Streaming<pb::EdgeMessage>,
    tx: Outbound,
    applied: u64,
) {
    let Attachment {
        session_id,
        mut desired,
        mut cut,
        parked,
    } = attachment;
    let shutdown = fleet.shutdown.clone();
    let max_age = tokio::time::sleep(jittered(fleet.settings.max_stream_age));
    tokio::pin!(max_age);
    let mut session = Session {
        fleet: fleet.clone(),
        node_id: node_id.clone(),
        tx: tx.clone(),
        next_nonce: 0,
        outstanding: None,
        parked,
        last_sent: None,
    };
    tracing::info!("stream open");
    let first = desired.borrow_and_update().clone();
    let mut ended = session.offer(&first, Some(applied)).await.is_err();

    while !ended {
        tokio::select! {
            status = &mut cut => {
                let status = status.unwrap_or_else(|_| Status::aborted("session ended"));
                tracing::info!(reason = status.message(), "stream cut");
                let _ = tx.send(Err(status)).await;
                ended = true;
            }
            _ = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down"))).await;
                ended = true;
            }
            _ = &mut max_age => {
                tracing::debug!("max stream age reached");
                ended = true;
            }
            changed = desired.changed() => {
                if changed.is_err() {
                    ended = true;
                } else {
                    let current = desired.borrow_and_update().clone();
                    ended = session.offer(&current, None).await.is_err();
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => {
                    if let Err(status) = session.on_message(msg).await {
                        let _ = tx.send(Err(status)).await;
                        ended = true;
                    }
                }
                Ok(None) => ended = true,
                Err(status) => {
                    let status = oversized(status);
                    // Malformed or oversized messages end the stream with their status;
                    // a vanished peer just ends it.
                    if matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted) {
                        tracing::info!(error = %status.message(), "bad message from edge");
                        let _ = tx.send(Err(status)).await;
                    }
                    ended = true;
                }
            },
            _ = tx.closed() => ended = true,
        }
    }
    fleet.registry.detach(&node_id, session_id);
    tracing::info!("stream closed");
}
