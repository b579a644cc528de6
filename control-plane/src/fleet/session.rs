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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aviary_certs::Identity;
use aviary_proto::v1 as pb;
use pb::edge_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::codec::ControlFrame;
use super::transfer::{plan, Plan, Transfer};
use super::Fleet;
use crate::audit::NewEvent;
use crate::layers::DesiredConfigs;
use crate::limits::oversized;
use crate::listener::PeerInfo;
use crate::node::{HealthRecord, ModuleRecord, TransferProgress};
use crate::registry::{Attachment, Desired, HelloInfo, SKIPPED};
use crate::rollout::DesiredModules;
use crate::selector::validate_label;
use aviary_proto::digest::Sha256;

/// Resource name of the weights in `Hello.applied`.
const WEIGHTS: &str = "weights";
/// Prefix of module resources in `Hello.applied` (`module/NAME`).
const MODULE: &str = "module/";
/// Prefix of runtime config resources in `Hello.applied` (`config/NAME`).
const CONFIG: &str = "config/";

type Outbound = mpsc::Sender<Result<ControlFrame, Status>>;

/// Most modules one node may name, in a Hello or a health report.
const MAX_MODULES: usize = 256;

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
        if let Err(e) = fleet.journal.audit(event, false).await {
            tracing::warn!(error = %e, "could not audit refused hello");
        }
        return Err(Status::permission_denied(reason));
    }
    let applied = hello
        .applied
        .iter()
        .find(|a| a.resource == WEIGHTS)
        .map_or(0, |a| a.revision);
    let applied_modules: BTreeMap<String, u64> = hello
        .applied
        .iter()
        .filter_map(|a| Some((a.resource.strip_prefix(MODULE)?.to_owned(), a.revision)))
        .collect();
    let applied_configs: BTreeMap<String, u64> = hello
        .applied
        .iter()
        .filter_map(|a| Some((a.resource.strip_prefix(CONFIG)?.to_owned(), a.revision)))
        .collect();
    let mut info = hello_info(hello)?;
    info.applied_weights = applied;
    info.applied_modules = applied_modules.clone();
    info.applied_configs = applied_configs.clone();
    let node = NodeView {
        arch: info.arch.clone(),
        installed: info
            .modules
            .iter()
            .filter(|m| m.slot.is_empty() || m.slot == "current")
            .filter_map(|m| Some((m.name.clone(), Sha256::parse_hex(&m.sha256)?)))
            .collect(),
        applied_modules,
        applied_configs,
    };
    let attachment = fleet.registry.attach(&node_id, info).await?;

    let (tx, rx) = mpsc::channel(4);
    let span = tracing::info_span!("fleet_stream", node_id = %node_id, peer = %peer.addr);
    tokio::spawn(tracing::Instrument::instrument(
        run(fleet, node_id, attachment, node, inbound, tx, applied),
        span,
    ));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Validates a Hello into what the registry stores (proto types stop here).
pub(crate) fn hello_info(hello: pb::Hello) -> Result<HelloInfo, Status> {
    if hello.labels.len() > 64 {
        return Err(Status::invalid_argument("at most 64 labels per node"));
    }
    for (k, v) in &hello.labels {
        validate_label(k, v)?;
    }
    if hello.modules.len() > MAX_MODULES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_MODULES} modules per node"
        )));
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
        applied_modules: BTreeMap::new(),
        applied_configs: BTreeMap::new(),
    })
}

/// Validates a health report into per-module records (proto types stop here). A number
/// that is not finite, a bad module name or more modules than a Hello may carry ends the
/// stream with the reason: a daemon of ours never sends them.
pub(crate) fn health_records(
    report: pb::HealthReport,
) -> Result<Vec<(String, HealthRecord)>, Status> {
    if report.modules.len() > MAX_MODULES {
        return Err(Status::invalid_argument(format!(
            "a health report names at most {MAX_MODULES} modules"
        )));
    }
    let at_ms = crate::audit::now_ms();
    let cut = |s: String| -> String { s.chars().take(256).collect() };
    let mut out = Vec::with_capacity(report.modules.len());
    for m in report.modules {
        aviary_certs::validate_name("module", &m.module)
            .map_err(|e| Status::invalid_argument(format!("health report: {e}")))?;
        let latency = |what: &str, v: f64| {
            aviary_proto::finite::check(what, v, 0.0..=f64::MAX).map_err(|e| {
                Status::invalid_argument(format!("health report for {}: {e}", m.module))
            })
        };
        let record = HealthRecord {
            at_ms,
            probe_successes: m.probe_successes,
            probe_failures: m.probe_failures,
            latency_p50_ms: latency("latency_p50_ms", m.latency_p50_ms)?,
            latency_p99_ms: latency("latency_p99_ms", m.latency_p99_ms)?,
            process_state: cut(m.process_state),
            restarts: m.restarts,
            log_matches: m.log_matches,
            slot: cut(m.slot),
            version: cut(m.version),
            detail: cut(m.detail),
        };
        out.push((m.module, record));
    }
    Ok(out)
}

/// What the Hello said about the node's modules.
struct NodeView {
    arch: String,
    /// module -> sha256 of the artifact in its current slot.
    installed: BTreeMap<String, Sha256>,
    /// module -> revision the node says it applied.
    applied_modules: BTreeMap<String, u64>,
    /// module -> config revision the node says it applied.
    applied_configs: BTreeMap<String, u64>,
}

/// Which resource a desired-state message is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Resource {
    Weights,
    Module(String),
    Config(String),
}

/// A desired-state message sent and not yet answered.
struct Outstanding {
    resource: Resource,
    revision: u64,
    committed_at: Instant,
}

/// A planned module update coming back from its planning task.
struct Planned {
    module: String,
    revision: u64,
    version: String,
    result: Result<Plan, String>,
}

struct Session {
    fleet: Arc<Fleet>,
    node_id: String,
    tx: Outbound,
    next_nonce: u64,
    /// Latest nonce per resource, and what it carried.
    outstanding: HashMap<String, Outstanding>,
    parked: Option<u64>,
    last_sent: Option<u64>,
    node: NodeView,
    modules_parked: BTreeMap<String, u64>,
    /// Module revisions offered on this stream (sent, being planned, or skipped).
    modules_offered: BTreeMap<String, u64>,
    /// The artifact each sent module update leads to (the next delta's base once ACKed).
    sent_to: BTreeMap<String, Sha256>,
    /// Per module, the config revision parked after a NACK.
    configs_parked: BTreeMap<String, u64>,
    /// Per module, the config revision sent last on this stream.
    configs_sent: BTreeMap<String, u64>,
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
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.send(ControlFrame {
            nonce: nonce.clone(),
            body,
        })
        .await?;
        self.outstanding.retain(|_, o| o.resource != resource);
        self.outstanding.insert(
            nonce,
            Outstanding {
                resource,
                revision,
                committed_at,
            },
        );
        Ok(())
    }

    /// Sends `desired` weights unless the node has them or refused them.
    async fn offer(&mut self, desired: &Desired, applied: Option<u64>) -> Result<(), ()> {
        if Some(desired.revision) == self.parked
            || Some(desired.revision) == self.last_sent
            || Some(desired.revision) == applied
        {
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
        self.last_sent = Some(desired.revision);
        Ok(())
    }

    /// Sends each module config the node has neither applied, refused nor been sent.
    async fn offer_configs(&mut self, desired: &DesiredConfigs) -> Result<(), ()> {
        for (module, c) in desired {
            let r = Some(c.revision);
            if r == self.configs_parked.get(module).copied()
                || r == self.configs_sent.get(module).copied()
                || r == self.node.applied_configs.get(module).copied()
            {
                continue;
            }
            self.send_desired(
                Resource::Config(module.clone()),
                c.revision,
                Instant::now(),
                c.message.clone(),
            )
            .await?;
            metrics::counter!("aviary_config_updates_sent_total").increment(1);
            self.configs_sent.insert(module.clone(), c.revision);
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
                self.modules_offered.remove(&module);
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
            Some(d.revision) != self.modules_parked.get(*m).copied()
                && Some(d.revision) != self.modules_offered.get(*m).copied()
                && Some(d.revision) != self.node.applied_modules.get(*m).copied()
        });
        let Some((module, d)) = next else {
            return Ok(());
        };
        self.busy = Some(module.clone());
        self.modules_offered.insert(module.clone(), d.revision);
        let (fleet, module, d) = (self.fleet.clone(), module.clone(), d.clone());
        let (arch, installed) = (
            self.node.arch.clone(),
            self.node.installed.get(&module).copied(),
        );
        tracing::debug!(%module, revision = d.revision, base = ?installed, "planning module update");
        let tx = self.planned_tx.clone();
        // Building a delta can take seconds: never in the stream's own loop.
        tokio::spawn(async move {
            let result = plan(&fleet, &module, &d, &arch, installed).await;
            let _ = tx
                .send(Planned {
                    module,
                    revision: d.revision,
                    version: d.version,
                    result,
                })
                .await;
        });
        Ok(())
    }

    /// Sends a planned update (or records why the node is skipped).
    async fn on_planned(&mut self, planned: Planned, desired: &DesiredModules) -> Result<(), ()> {
        let current = desired.get(&planned.module).map(|d| d.revision);
        if current != Some(planned.revision) {
            // Superseded while planning; plan the new one.
            self.busy = None;
            self.modules_offered.remove(&planned.module);
            return Ok(());
        }
        match planned.result {
            Ok(Plan::Send { body, payload, to }) => {
                self.sent_to.insert(planned.module.clone(), to);
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
                self.fleet.registry.record_module_nack(
                    &self.node_id,
                    &planned.module,
                    planned.revision,
                    &format!("{SKIPPED}{reason}"),
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
            Some(Kind::Ack(ack)) => {
                let Some(out) = self.take_outstanding(&ack.nonce) else {
                    return Ok(());
                };
                metrics::counter!("aviary_acks_total").increment(1);
                metrics::histogram!("aviary_propagation_seconds")
                    .record(out.committed_at.elapsed().as_secs_f64());
                tracing::debug!(revision = out.revision, resource = ?out.resource, "ack");
                match out.resource {
                    Resource::Weights => {
                        self.fleet.registry.record_ack(&self.node_id, out.revision)
                    }
                    Resource::Module(module) => {
                        tracing::info!(%module, revision = out.revision, "module update acknowledged");
                        self.fleet
                            .registry
                            .record_module_ack(&self.node_id, &module, out.revision);
                        self.node
                            .applied_modules
                            .insert(module.clone(), out.revision);
                        if let Some(to) = self.sent_to.remove(&module) {
                            self.node.installed.insert(module.clone(), to);
                        }
                        self.end_module(&module);
                    }
                    Resource::Config(module) => {
                        tracing::info!(%module, revision = out.revision, "config acknowledged");
                        self.fleet
                            .registry
                            .record_config_ack(&self.node_id, &module, out.revision);
                        self.node.applied_configs.insert(module, out.revision);
                    }
                }
            }
            Some(Kind::Nack(nack)) => {
                let Some(out) = self.take_outstanding(&nack.nonce) else {
                    return Ok(());
                };
                let error: String = nack.error.chars().take(1024).collect();
                metrics::counter!("aviary_nacks_total").increment(1);
                tracing::info!(revision = out.revision, resource = ?out.resource, %error, "nack: revision parked");
                let target = match &out.resource {
                    Resource::Weights => {
                        self.parked = Some(out.revision);
                        self.fleet
                            .registry
                            .record_nack(&self.node_id, out.revision, &error);
                        format!("node/{}", self.node_id)
                    }
                    Resource::Module(module) => {
                        self.modules_parked.insert(module.clone(), out.revision);
                        self.fleet.registry.record_module_nack(
                            &self.node_id,
                            module,
                            out.revision,
                            &error,
                        );
                        let module = module.clone();
                        self.end_module(&module);
                        format!("node/{}", self.node_id)
                    }
                    Resource::Config(module) => {
                        self.configs_parked.insert(module.clone(), out.revision);
                        self.fleet.registry.record_config_nack(
                            &self.node_id,
                            module,
                            out.revision,
                            &error,
                        );
                        format!("node/{}", self.node_id)
                    }
                };
                let what = match &out.resource {
                    Resource::Weights => "weights".to_owned(),
                    Resource::Module(m) => format!("module {m}"),
                    Resource::Config(m) => format!("config of {m}"),
                };
                let event = NewEvent::new(
                    format!("edge/{}", self.node_id),
                    "fleet.nack",
                    target,
                    format!("{what} revision {} refused: {error}", out.revision),
                );
                if let Err(e) = self.fleet.journal.audit(event, false).await {
                    tracing::warn!(error = %e, "could not audit nack");
                }
            }
            Some(Kind::Progress(p)) => self.on_progress(p).await?,
            Some(Kind::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello is allowed only as the first message",
                ));
            }
            // Kept per node; the rollout engine judges windows of them.
            Some(Kind::Health(report)) => {
                let records = health_records(report)?;
                let ignored = self.fleet.registry.record_health(&self.node_id, records);
                if ignored > 0 {
                    metrics::counter!("aviary_health_ignored_total").increment(ignored as u64);
                }
            }
            None => return Err(Status::invalid_argument("EdgeMessage without a kind")),
        }
        Ok(())
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

    fn take_outstanding(&mut self, nonce: &str) -> Option<Outstanding> {
        match self.outstanding.remove(nonce) {
            Some(o) => Some(o),
            None => {
                metrics::counter!("aviary_stale_answers_total").increment(1);
                tracing::debug!(nonce, "answer with a stale nonce ignored");
                None
            }
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
    node: NodeView,
    mut inbound: Streaming<pb::EdgeMessage>,
    tx: Outbound,
    applied: u64,
) {
    let Attachment {
        session_id,
        mut desired,
        mut cut,
        parked,
        mut modules,
        modules_parked,
        mut configs,
        configs_parked,
    } = attachment;
    let shutdown = fleet.shutdown.clone();
    let max_age = tokio::time::sleep(jittered(fleet.settings.max_stream_age));
    tokio::pin!(max_age);
    let (planned_tx, mut planned_rx) = mpsc::channel(1);
    let mut session = Session {
        fleet: fleet.clone(),
        node_id: node_id.clone(),
        tx: tx.clone(),
        next_nonce: 0,
        outstanding: HashMap::new(),
        parked,
        last_sent: None,
        node,
        modules_parked,
        configs_parked,
        configs_sent: BTreeMap::new(),
        modules_offered: BTreeMap::new(),
        sent_to: BTreeMap::new(),
        busy: None,
        transfer: None,
        planned_tx,
    };
    tracing::info!("stream open");
    let first = desired.borrow_and_update().clone();
    let mut ended = session.offer(&first, Some(applied)).await.is_err();
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
            changed = desired.changed() => {
                if changed.is_err() {
                    ended = true;
                } else {
                    let current = desired.borrow_and_update().clone();
                    ended = session.offer(&current, None).await.is_err();
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
