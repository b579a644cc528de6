//! One fleet stream, from Hello to its end: the xDS-style send / ACK / NACK state machine.
//!
//! * The first message must be a Hello naming the node id of the client certificate.
//! * Three kinds of resources: the node's weights, each module it should run, and each
//!   module's runtime config. Each is sent when it differs from what the Hello says is
//!   applied, then on every change. Each send carries a fresh stream-local nonce.
//! * An ACK or NACK counts only if it carries the latest nonce of its resource; others
//!   are stale and ignored. A NACKed revision is parked: not sent again on this or any
//!   later stream until the desired state of that resource moves to another revision.
//! * Module updates go one at a time, their payload paced by the edge (`transfer.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use aviary_certs::Identity;
use aviary_proto::v1 as pb;
use pb::edge_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::codec::ControlFrame;
use super::hello::health_records;
use super::tracker::Tracker;
use super::transfer::{plan, Plan, Transfer};
use super::Fleet;
use crate::audit::NewEvent;
use crate::inventory::{Artifact, Outcome};
use crate::layers::DesiredConfigs;
use crate::limits::oversized;
use crate::listener::PeerInfo;
use crate::node::TransferProgress;
use crate::registry::{Answer, Attachment, Desired, HelloInfo, SKIPPED};
use crate::rollout::DesiredModules;
use aviary_proto::digest::Sha256;
use aviary_proto::resource::Resource;

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
    let Some(Identity::Edge(node_id)) = peer.identity.clone() else {
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
            format!("edge/{node_id}"),
            "auth.denied",
            format!("node/{node_id}"),
            reason.clone(),
        );
        if let Err(e) = fleet.journal.audit(event, false).await {
            tracing::warn!(error = %e, "could not audit refused hello");
        }
        return Err(Status::permission_denied(reason));
    }
    let info = HelloInfo::try_from(hello)?;
    let node = NodeView {
        arch: info.arch.clone(),
        installed: info
            .modules
            .iter()
            .filter(|m| m.slot.is_empty() || m.slot == "current")
            .filter_map(|m| Some((m.name.clone(), Sha256::parse_hex(&m.sha256)?)))
            .collect(),
    };
    let applied = info.applied.clone();
    let attachment = fleet.registry.attach(&node_id, info).await?;

    let (tx, rx) = mpsc::channel(4);
    let span = tracing::info_span!("fleet_stream", node_id = %node_id, peer = %peer.addr);
    tokio::spawn(tracing::Instrument::instrument(
        run(fleet, node_id, attachment, node, inbound, tx, applied),
        span,
    ));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// What the Hello said about the node's modules.
struct NodeView {
    arch: String,
    /// module -> sha256 of the artifact in its current slot.
    installed: BTreeMap<String, Sha256>,
}

/// Where a sent module update leads the node.
struct SentTo {
    version: String,
    sha256: Sha256,
    rollback: bool,
}

/// A planned module update coming back from its planning task.
struct Planned {
    module: String,
    revision: u64,
    version: String,
    rollback: bool,
    result: Result<Plan, String>,
}

struct Session {
    fleet: Arc<Fleet>,
    node_id: String,
    tx: Outbound,
    /// What each resource was offered, answered and refused on this stream.
    tracker: Tracker,
    node: NodeView,
    /// What each sent module update leads to (the next delta's base once ACKed).
    sent_to: BTreeMap<String, SentTo>,
    /// At most one module update at a time: being planned, or transferring.
    busy: Option<String>,
    transfer: Option<Transfer>,
    planned_tx: mpsc::Sender<Planned>,
}

impl Session {
    async fn send(&mut self, frame: ControlFrame) -> Result<(), ()> {
        match tokio::time::timeout(self.fleet.settings.send_timeout, self.tx.send(Ok(frame))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(()),
            Err(_) => {
                tracing::warn!("peer does not read its stream; dropping it");
                Err(())
            }
        }
    }

    /// Sends a desired-state body with a fresh nonce; older nonces of the resource go stale.
    async fn send_desired(
        &mut self,
        resource: Resource,
        revision: u64,
        committed_at: Instant,
        body: bytes::Bytes,
    ) -> Result<(), ()> {
        let nonce = self.tracker.sent(resource, revision, committed_at);
        self.send(ControlFrame { nonce, body }).await
    }

    /// Sends `desired` weights unless the node has them, refused them or was sent them.
    async fn offer(&mut self, desired: &Desired) -> Result<(), ()> {
        if !self.tracker.wants(&Resource::Weights, desired.revision) {
            return Ok(());
        }
        self.send_desired(
            Resource::Weights,
            desired.revision,
            desired.committed_at,
            desired.message.clone(),
        )
        .await?;
        metrics::counter!("aviary_weight_assignments_sent_total").increment(1);
        Ok(())
    }

    /// Sends each module config the node has neither applied, refused nor been sent.
    async fn offer_configs(&mut self, desired: &DesiredConfigs) -> Result<(), ()> {
        for (module, c) in desired {
            let resource = Resource::Config(module.clone());
            if !self.tracker.wants(&resource, c.revision) {
                continue;
            }
            self.send_desired(resource, c.revision, Instant::now(), c.message.clone())
                .await?;
            metrics::counter!("aviary_config_updates_sent_total").increment(1);
        }
        Ok(())
    }

    /// Starts planning the next module the node needs, unless one is under way. A change
    /// of the module being sent aborts its transfer first.
    async fn offer_modules(&mut self, desired: &DesiredModules) -> Result<(), ()> {
        if let Some(t) = &self.transfer {
            if desired.get(&t.module).map(|d| d.revision) != Some(t.revision) {
                let abort = pb::ControlMessage {
                    nonce: String::new(),
                    kind: Some(pb::control_message::Kind::AbortTransfer(
                        pb::AbortTransfer {
                            transfer_id: t.id.clone(),
                            reason: "superseded by a newer desired state".into(),
                        },
                    )),
                };
                let module = t.module.clone();
                self.transfer = None;
                self.busy = None;
                self.tracker.withdraw(&Resource::Module(module.clone()));
                self.fleet
                    .registry
                    .record_transfer(&self.node_id, &module, None);
                self.send(ControlFrame {
                    nonce: String::new(),
                    body: prost::Message::encode_to_vec(&abort).into(),
                })
                .await?;
            }
        }
        if self.busy.is_some() {
            return Ok(());
        }
        let next = desired.iter().find(|(m, d)| {
            self.tracker
                .wants(&Resource::Module((*m).clone()), d.revision)
        });
        let Some((module, d)) = next else {
            return Ok(());
        };
        self.busy = Some(module.clone());
        self.tracker
            .offer(&Resource::Module(module.clone()), d.revision);
        let (fleet, module, d) = (self.fleet.clone(), module.clone(), d.clone());
        let (arch, installed) = (
            self.node.arch.clone(),
            self.node.installed.get(&module).copied(),
        );
        tracing::debug!(%module, revision = d.revision, base = ?installed, "planning module update");
        let tx = self.planned_tx.clone();
        // Building a delta can take seconds: never in the stream's own loop. The task
        // keeps the stream's span (node_id) under one of its own.
        let span = tracing::info_span!(
            "plan_update",
            module = %module,
            version = %d.version,
            revision = d.revision
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = plan(&fleet, &module, &d, &arch, installed).await;
                let _ = tx
                    .send(Planned {
                        module,
                        revision: d.revision,
                        version: d.version,
                        rollback: d.rollback,
                        result,
                    })
                    .await;
            },
            span,
        ));
        Ok(())
    }

    /// Sends a planned update (or records why the node is skipped).
    async fn on_planned(&mut self, planned: Planned, desired: &DesiredModules) -> Result<(), ()> {
        let current = desired.get(&planned.module).map(|d| d.revision);
        if current != Some(planned.revision) {
            // Superseded while planning; plan the new one.
            self.busy = None;
            self.tracker
                .withdraw(&Resource::Module(planned.module.clone()));
            return Ok(());
        }
        match planned.result {
            Ok(Plan::Send { body, payload, to }) => {
                self.sent_to.insert(
                    planned.module.clone(),
                    SentTo {
                        version: planned.version.clone(),
                        sha256: to,
                        rollback: planned.rollback,
                    },
                );
                self.send_desired(
                    Resource::Module(planned.module.clone()),
                    planned.revision,
                    Instant::now(),
                    body,
                )
                .await?;
                metrics::counter!("aviary_module_updates_sent_total").increment(1);
                // A rollback has no payload: its ACK ends it.
                if let Some((id, payload)) = payload {
                    self.transfer = Some(Transfer::new(
                        id,
                        planned.module,
                        planned.revision,
                        planned.version,
                        payload,
                    ));
                }
            }
            Ok(Plan::Skip(reason)) => {
                tracing::info!(module = %planned.module, %reason, "module skipped");
                self.fleet.registry.record_answer(
                    &self.node_id,
                    &Resource::Module(planned.module.clone()),
                    planned.revision,
                    &Answer::Nack(format!("{SKIPPED}{reason}")),
                );
                self.busy = None;
            }
            Err(reason) => {
                tracing::warn!(module = %planned.module, %reason, "could not prepare a module update");
                // Retried when the desired state changes or the node reconnects.
                self.busy = None;
            }
        }
        Ok(())
    }

    /// The edge stands at `offset` of a transfer: send it the next chunk.
    async fn on_progress(&mut self, p: pb::TransferProgress) -> Result<(), Status> {
        let Some(t) = self.transfer.as_mut().filter(|t| t.id == p.transfer_id) else {
            return Ok(()); // an old or aborted transfer
        };
        self.fleet.registry.record_transfer(
            &self.node_id,
            &t.module,
            Some(TransferProgress {
                version: t.version.clone(),
                encoding: t.encoding().into(),
                offset: p.offset,
                size: t.payload.info.size,
            }),
        );
        let chunk = t
            .chunk_at(p.offset)
            .await
            .map_err(|e| Status::internal(format!("payload read: {e}")))?;
        if let Some(frame) = chunk {
            let (encoding, len) = (t.encoding(), frame.body.len());
            if self.send(frame).await.is_err() {
                return Err(Status::unavailable("stream closed"));
            }
            metrics::counter!("aviary_transfer_bytes_total", "encoding" => encoding)
                .increment(len as u64);
        }
        Ok(())
    }

    /// Handles one message from the edge; `Err` ends the stream with that status.
    async fn on_message(&mut self, msg: pb::EdgeMessage) -> Result<(), Status> {
        match msg.kind {
            Some(Kind::Ack(ack)) => self.on_answer(&ack.nonce, Answer::Ack, false).await,
            Some(Kind::Nack(nack)) => {
                let error: String = nack.error.chars().take(1024).collect();
                self.on_answer(&nack.nonce, Answer::Nack(error), nack.rolled_back)
                    .await;
            }
            Some(Kind::Progress(p)) => self.on_progress(p).await?,
            Some(Kind::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello is allowed only as the first message",
                ));
            }
            // Kept per node; the rollout engine judges windows of them.
            Some(Kind::Health(report)) => {
                metrics::counter!("aviary_heartbeats_total").increment(1);
                let records = health_records(report)?;
                let ignored = self.fleet.registry.record_health(&self.node_id, records);
                if ignored > 0 {
                    metrics::counter!("aviary_health_ignored_total").increment(ignored as u64);
                }
            }
            Some(Kind::Renew(req)) => {
                let frame = super::renewal::answer(&self.fleet, &self.node_id, req).await;
                let _ = self.send(frame).await;
            }
            None => return Err(Status::invalid_argument("EdgeMessage without a kind")),
        }
        Ok(())
    }

    /// An ACK or NACK: counted if it answers the latest send of its resource, recorded in
    /// the registry, and (a NACK) audited. `rolled_back`: a module NACK whose update was
    /// installed, failed, and was undone on the node.
    async fn on_answer(&mut self, nonce: &str, answer: Answer, rolled_back: bool) {
        let Some(out) = self.tracker.answer(nonce, &answer) else {
            metrics::counter!("aviary_stale_answers_total").increment(1);
            tracing::debug!(nonce, "answer with a stale nonce ignored");
            return;
        };
        let (resource, revision) = (&out.resource, out.revision);
        self.fleet
            .registry
            .record_answer(&self.node_id, resource, revision, &answer);
        let error = match &answer {
            Answer::Ack => {
                metrics::counter!("aviary_acks_total").increment(1);
                metrics::histogram!("aviary_propagation_seconds")
                    .record(out.committed_at.elapsed().as_secs_f64());
                tracing::debug!(revision, %resource, "ack");
                None
            }
            Answer::Nack(error) => {
                metrics::counter!("aviary_nacks_total").increment(1);
                tracing::info!(revision, %resource, %error, "nack: revision parked");
                Some(error)
            }
        };
        if let Resource::Module(module) = resource {
            let sent = self.sent_to.remove(module);
            if error.is_none() {
                tracing::info!(module, revision, "module update acknowledged");
            }
            if let Some(to) = sent.filter(|_| error.is_none() || rolled_back) {
                let artifact = Artifact {
                    version: to.version,
                    sha256: to.sha256.hex(),
                };
                let outcome = if error.is_none() {
                    // The next delta's base.
                    self.node.installed.insert(module.clone(), to.sha256);
                    Outcome::Installed {
                        rollback: to.rollback,
                    }
                } else {
                    Outcome::WentBack
                };
                self.fleet
                    .registry
                    .record_installed(&self.node_id, module, artifact, outcome);
            }
            let module = module.clone();
            self.end_module(&module);
        } else if let (Resource::Config(module), None) = (resource, error) {
            tracing::info!(module, revision, "config acknowledged");
        }
        if let Some(error) = error {
            self.fleet
                .audit_nack(&self.node_id, resource, revision, error)
                .await;
        }
    }

    /// The module's update is answered: free the slot for the next one.
    fn end_module(&mut self, module: &str) {
        if self.transfer.as_ref().is_some_and(|t| t.module == module) {
            if let Some(t) = self.transfer.take() {
                tracing::info!(%module, bytes = t.sent, encoding = t.encoding(), "transfer done");
            }
        }
        if self.busy.as_deref() == Some(module) {
            self.busy = None;
        }
    }
}

async fn run(
    fleet: Arc<Fleet>,
    node_id: String,
    attachment: Attachment,
    node: NodeView,
    mut inbound: Streaming<pb::EdgeMessage>,
    tx: Outbound,
    applied: BTreeMap<Resource, u64>,
) {
    let Attachment {
        session_id,
        mut desired,
        mut cut,
        parked,
        mut modules,
        mut configs,
    } = attachment;
    let shutdown = fleet.shutdown.clone();
    let mut bundle = fleet.identity.authority.subscribe_bundle();
    bundle.mark_changed();
    let max_age = tokio::time::sleep(super::jittered(fleet.settings.max_stream_age));
    tokio::pin!(max_age);
    let (planned_tx, mut planned_rx) = mpsc::channel(1);
    let mut session = Session {
        fleet: fleet.clone(),
        node_id: node_id.clone(),
        tx: tx.clone(),
        tracker: Tracker::new(&applied, &parked),
        node,
        sent_to: BTreeMap::new(),
        busy: None,
        transfer: None,
        planned_tx,
    };
    tracing::info!("stream open");
    let first = desired.borrow_and_update().clone();
    let mut ended = session.offer(&first).await.is_err();
    if !ended {
        let first = modules.borrow_and_update().clone();
        ended = session.offer_modules(&first).await.is_err();
    }
    if !ended {
        let first = configs.borrow_and_update().clone();
        ended = session.offer_configs(&first).await.is_err();
    }

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
            Ok(()) = bundle.changed() => {
                let frame = super::renewal::bundle_frame(&bundle.borrow_and_update());
                ended = session.send(frame).await.is_err();
            }
            changed = desired.changed() => {
                if changed.is_err() {
                    ended = true;
                } else {
                    let current = desired.borrow_and_update().clone();
                    ended = session.offer(&current).await.is_err();
                }
            }
            changed = modules.changed() => {
                if changed.is_err() {
                    ended = true;
                } else {
                    let current = modules.borrow_and_update().clone();
                    ended = session.offer_modules(&current).await.is_err();
                }
            }
            changed = configs.changed() => {
                if changed.is_err() {
                    ended = true;
                } else {
                    let current = configs.borrow_and_update().clone();
                    ended = session.offer_configs(&current).await.is_err();
                }
            }
            Some(planned) = planned_rx.recv() => {
                let current = modules.borrow().clone();
                ended = session.on_planned(planned, &current).await.is_err()
                    || session.offer_modules(&current).await.is_err();
            }
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => {
                    if let Err(status) = session.on_message(msg).await {
                        let _ = tx.send(Err(status)).await;
                        ended = true;
                    } else if session.busy.is_none() {
                        let current = modules.borrow().clone();
                        ended = session.offer_modules(&current).await.is_err();
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
