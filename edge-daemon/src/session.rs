//! The edge side of the fleet stream: connect, Hello, apply and answer each desired-state
//! message with ACK or NACK, and reconnect with full-jitter backoff when the stream ends.
//! The backoff resets only once the control plane has answered (response headers arrive
//! after it accepted the Hello), so a control plane that refuses us is not hammered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aviary_proto::resource::Resource;
use aviary_proto::v1 as pb;
use pb::control_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use aviary_proto::bundle::{Encoding, PayloadInfo};

use crate::backoff::Backoff;
use crate::local::Local;
use crate::modules::{partial_transfers, Checked, InstallError, Installer, Receiving, Verdict};
use crate::runtime::Runtime;
use crate::weights::{Assignment, Weights};
use crate::EdgeError;
use aviary_certs::Link;

/// How often module health goes to the control plane.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Health ticks between empty reports when no module runs (10 s).
const HEARTBEAT_TICKS: u64 = 10;

/// How often a connected daemon records contact in `state.json`.
const TOUCH_INTERVAL: Duration = Duration::from_secs(10);

/// Who this daemon is, for the Hello.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) node_id: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) arch: String,
    /// The node's certificate: renewed on the stream, re-enrolled once expired.
    pub(crate) renewal: Arc<crate::renewal::Renewal>,
}

/// Keeps a fleet stream up until `shutdown`.
pub(crate) async fn run(
    identity: Identity,
    weights: Arc<Weights>,
    local: Arc<Local>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        // An expired certificate fails every handshake: enroll again first.
        if identity.renewal.expired() {
            match identity.renewal.reenroll(&shutdown).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => tracing::error!(error = %e, "could not enroll again"),
            }
        }
        // Built for each connection: the trust bundle may have changed on the last one.
        let link = match identity.renewal.link() {
            Ok(link) => link,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the link; keeping the daemon up");
                metrics::counter!("aviary_edge_reconnects_total").increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => break,
            outcome = stream_once(&link, &identity, &weights, &local, &mut backoff) => outcome,
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
    local: &Arc<Local>,
    backoff: &mut Backoff,
) -> Result<(), StreamError> {
    let channel = link.connect().await.map_err(EdgeError::from)?;
    let mut client =
        pb::fleet_client::FleetClient::new(channel).max_decoding_message_size(16 << 20);
    let (tx, rx) = mpsc::channel(16);
    let (modules, mut applied, partial) = {
        let installer = local.installer.clone();
        tokio::task::spawn_blocking(move || module_report(&installer))
            .await
            .unwrap_or_default()
    };
    applied.push(pb::AppliedRevision {
        resource: Resource::Weights.to_string(),
        revision: weights.applied_revision(),
    });
    let hello = pb::Hello {
        node_id: identity.node_id.clone(),
        labels: identity.labels.clone().into_iter().collect(),
        arch: identity.arch.clone(),
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        modules,
        applied,
        partial_transfers: partial,
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
    let mut incoming: Option<Incoming> = None;
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    let renewal = &identity.renewal;
    let mut renew_at = tokio::time::Instant::now() + renewal.due_in();
    let mut ticks = 0u64;
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = health.tick() => {
                ticks += 1;
                // With nothing to report, an empty report now and then is the heartbeat
                // the control plane shows as last_heartbeat.
                let report = health_report(&local.runtime)
                    .or_else(|| ticks.is_multiple_of(HEARTBEAT_TICKS).then(pb::HealthReport::default));
                if let Some(report) = report {
                    send(&tx, pb::edge_message::Kind::Health(report)).await?;
                }
            }
            _ = tokio::time::sleep_until(renew_at) => {
                // A rotating request writes its new key: off this single-threaded runtime.
                let r = renewal.clone();
                let request = blocking(move || r.request()).await?;
                send(&tx, pb::edge_message::Kind::Renew(request)).await?;
                renew_at = tokio::time::Instant::now() + renewal.answer_timeout();
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::ControlMessage { kind: Some(Kind::Certificate(issued)), .. })) => {
                    let r = renewal.clone();
                    match blocking(move || r.install(&issued)).await {
                        Ok(()) => renew_at = tokio::time::Instant::now() + renewal.due_in(),
                        // Asked again after the answer timeout, until the certificate ends.
                        Err(e) => tracing::warn!(error = %e, "renewal failed"),
                    }
                }
                Ok(Some(pb::ControlMessage { kind: Some(Kind::TrustBundle(bundle)), .. })) => {
                    let r = renewal.clone();
                    if let Err(e) = blocking(move || r.take_bundle(&bundle)).await {
                        tracing::warn!(error = %e, "trust bundle refused");
                    }
                }
                Ok(Some(msg)) => handle(msg, weights, local, &mut incoming, &tx).await?,
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

/// Handles one message; a module update and the chunks of its payload run in an
/// `install` span naming the module and revision.
async fn handle(
    msg: pb::ControlMessage,
    weights: &Arc<Weights>,
    local: &Arc<Local>,
    incoming: &mut Option<Incoming>,
    tx: &mpsc::Sender<pb::EdgeMessage>,
) -> Result<(), StreamError> {
    let span = match (&msg.kind, incoming.as_ref()) {
        (Some(Kind::ModuleUpdate(u)), _) => {
            tracing::info_span!("install", module = %u.module, revision = u.revision)
        }
        (Some(Kind::Chunk(_)), Some(i)) => tracing::info_span!(
            "install",
            module = %i.checked.manifest.module,
            version = %i.checked.manifest.version,
            revision = i.revision
        ),
        _ => tracing::Span::none(),
    };
    tracing::Instrument::instrument(handle_message(msg, weights, local, incoming, tx), span).await
}

async fn handle_message(
    msg: pb::ControlMessage,
    weights: &Arc<Weights>,
    local: &Arc<Local>,
    incoming: &mut Option<Incoming>,
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
                    refuse(tx, nonce, revision, e.to_string()).await
                }
            }
        }
        Some(Kind::ModuleUpdate(update)) => {
            if let Some(old) = incoming.take() {
                // Superseded: keep its bytes only if the same transfer comes back.
                if old.receiving.record.transfer_id != update.transfer_id {
                    old.receiving.discard();
                }
            }
            let revision = update.revision;
            let module = update.module.clone();
            let _busy = local.busy.lock().await;
            match start_update(update, local).await {
                Ok(Started::Done(what)) => {
                    tracing::info!(%module, revision, "{what}");
                    // The processes follow the slots (a rollback switches them back).
                    if let Err(e) = local.runtime.activate(&module).await {
                        let e = InstallError::NotReady(e);
                        return nack(tx, nonce, revision, &module, &e).await;
                    }
                    send(tx, pb::edge_message::Kind::Ack(pb::Ack { nonce, revision })).await
                }
                Ok(Started::Receiving(checked, receiving)) => {
                    let progress = progress_of(&receiving);
                    tracing::info!(%module, revision, offset = receiving.len(), size = receiving.info.size, payload = %receiving.info.sha256, "receiving module payload");
                    *incoming = Some(Incoming {
                        nonce,
                        revision,
                        checked,
                        receiving,
                    });
                    send(tx, progress).await
                }
                Err(e) => nack(tx, nonce, revision, &module, &e).await,
            }
        }
        Some(Kind::Chunk(chunk)) => {
            if incoming
                .as_ref()
                .is_none_or(|i| i.receiving.record.transfer_id != chunk.transfer_id)
            {
                return Ok(()); // an aborted or superseded transfer
            }
            let Some(mut inc) = incoming.take() else {
                return Ok(());
            };
            // The write (and its fsync every MiB) stays off this single-threaded runtime.
            let appended = tokio::task::spawn_blocking(move || {
                let r = inc.receiving.append(chunk.offset, &chunk.data);
                (inc, r)
            })
            .await;
            let inc = match appended {
                Ok((inc, Ok(_))) => inc,
                Ok((inc, Err(e))) => {
                    let module = inc.checked.manifest.module.clone();
                    inc.receiving.discard();
                    return nack(tx, inc.nonce, inc.revision, &module, &e).await;
                }
                Err(e) => {
                    // Reconnecting resumes the transfer from its last checkpoint.
                    tracing::error!(error = %e, "payload write task failed");
                    return Err(StreamError::Closed);
                }
            };
            if !inc.receiving.complete() {
                let progress = progress_of(&inc.receiving);
                *incoming = Some(inc);
                return send(tx, progress).await;
            }
            send(tx, progress_of(&inc.receiving)).await?;
            let (nonce, revision) = (inc.nonce.clone(), inc.revision);
            let module = inc.checked.manifest.module.clone();
            let _busy = local.busy.lock().await;
            let previous_revision = local
                .installer
                .modules()
                .state(&module)
                .map_or(0, |s| s.revision);
            let installer = local.installer.clone();
            let result = tokio::task::spawn_blocking(move || {
                installer.complete(&inc.checked, inc.receiving, inc.revision)
            })
            .await
            .unwrap_or_else(|e| Err(InstallError::Bundle(format!("install task: {e}"))));
            match result {
                Ok(slot) => {
                    tracing::info!(%module, version = %slot.version, revision, "module installed");
                    metrics::counter!("aviary_edge_installs_total").increment(1);
                    match activate_or_roll_back(local, &module, previous_revision).await {
                        Ok(()) => {
                            send(tx, pb::edge_message::Kind::Ack(pb::Ack { nonce, revision })).await
                        }
                        Err(e) => nack(tx, nonce, revision, &module, &e).await,
                    }
                }
                Err(e) => nack(tx, nonce, revision, &module, &e).await,
            }
        }
        Some(Kind::Config(update)) => {
            let (module, revision) = (update.module.clone(), update.revision);
            match crate::runtime_config::apply(local, update).await {
                Ok(applied) => {
                    tracing::info!(%module, revision, ?applied, "runtime config applied");
                    send(tx, pb::edge_message::Kind::Ack(pb::Ack { nonce, revision })).await
                }
                Err(error) => {
                    tracing::warn!(%module, revision, %error, "runtime config refused");
                    refuse(tx, nonce, revision, error).await
                }
            }
        }
        Some(Kind::AbortTransfer(abort)) => {
            if incoming
                .as_ref()
                .is_some_and(|i| i.receiving.record.transfer_id == abort.transfer_id)
            {
                if let Some(inc) = incoming.take() {
                    tracing::info!(transfer = %abort.transfer_id, reason = %abort.reason, "transfer aborted by the control plane");
                    inc.receiving.discard();
                }
            }
            Ok(())
        }
        // Answered in `stream_once`, which holds the renewal.
        Some(Kind::Certificate(_) | Kind::TrustBundle(_)) | None => Ok(()),
    }
}

/// Every supervised module's figures since the last report (none: nothing to say).
fn health_report(runtime: &Runtime) -> Option<pb::HealthReport> {
    let modules: Vec<pb::ModuleHealth> = runtime
        .stats()
        .into_iter()
        .map(|(name, stats)| {
            let mut w = stats.take_window();
            w.latencies_ms.sort_by(|a, b| a.total_cmp(b));
            let pct = |q: f64| {
                if w.latencies_ms.is_empty() {
                    0.0
                } else {
                    let i = ((w.latencies_ms.len() - 1) as f64 * q).round() as usize;
                    w.latencies_ms[i]
                }
            };
            let (version, slot) = stats
                .running
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_default();
            pb::ModuleHealth {
                module: name,
                probe_successes: w.successes,
                probe_failures: w.failures,
                latency_p50_ms: pct(0.5),
                latency_p99_ms: pct(0.99),
                process_state: stats.state.lock().map(|s| s.clone()).unwrap_or_default(),
                restarts: u32::try_from(stats.restarts.load(std::sync::atomic::Ordering::Relaxed))
                    .unwrap_or(u32::MAX),
                log_matches: stats.log_matches.load(std::sync::atomic::Ordering::Relaxed),
                slot,
                version,
                detail: w.detail,
            }
        })
        .collect();
    (!modules.is_empty()).then_some(pb::HealthReport { modules })
}

/// Starts the newly installed slot; if it never becomes ready, puts the previous slot
/// back (its process kept serving, or is started again) and says why.
async fn activate_or_roll_back(
    local: &Arc<Local>,
    module: &str,
    previous_revision: u64,
) -> Result<(), InstallError> {
    let Err(reason) = local.runtime.activate(module).await else {
        return Ok(());
    };
    let installer = local.installer.clone();
    let name = module.to_owned();
    let back =
        tokio::task::spawn_blocking(move || installer.rollback(&name, None, previous_revision))
            .await
            .unwrap_or_else(|e| Err(InstallError::Bundle(format!("rollback task: {e}"))));
    let error = match back {
        Ok(slot) => {
            // Make sure the old version runs (a no-op when the hot swap kept it serving).
            if let Err(e) = local.runtime.activate(module).await {
                tracing::error!(module, error = %e, "previous version does not start either");
            }
            metrics::counter!("aviary_edge_local_rollbacks_total").increment(1);
            InstallError::RolledBack(format!("{reason}; rolled back locally to {}", slot.version))
        }
        Err(e) => InstallError::NotReady(format!(
            "{reason}; no previous version to roll back to ({e})"
        )),
    };
    tracing::warn!(module, %error, "new version not ready");
    Err(error)
}

/// A module update being received on this stream.
struct Incoming {
    nonce: String,
    revision: u64,
    checked: Box<Checked>,
    receiving: Receiving,
}

enum Started {
    /// Answered at once (already installed, or a rollback done).
    Done(&'static str),
    /// Bytes to receive.
    Receiving(Box<Checked>, Receiving),
}

/// Checks an update before any payload byte, and opens (or resumes) its transfer.
async fn start_update(
    update: pb::ModuleUpdate,
    local: &Arc<Local>,
) -> Result<Started, InstallError> {
    let installer = local.installer.clone();
    tokio::task::spawn_blocking(move || {
        if update.rollback {
            // The manifest of the version to go back to must still be signed by us, and the
            // message may only name what it signs: its module name becomes a path.
            let m = installer.verify(&update.manifest, &update.signature)?;
            if m.module != update.module || m.version != update.to_version {
                return Err(InstallError::Bundle(format!(
                    "rollback names {:?} {:?} but its manifest is {} {}",
                    update.module, update.to_version, m.module, m.version
                )));
            }
            installer.rollback(&m.module, Some(&m.version), update.revision)?;
            return Ok(Started::Done("rolled back to the previous slot"));
        }
        let checked = match installer.check(&update.manifest, &update.signature)? {
            Verdict::AlreadyInstalled(_) => return Ok(Started::Done("already installed")),
            Verdict::Install(checked) => checked,
        };
        if checked.manifest.module != update.module || checked.manifest.version != update.to_version
        {
            return Err(InstallError::Bundle(format!(
                "update names {} {} but its manifest is {} {}",
                update.module, update.to_version, checked.manifest.module, checked.manifest.version
            )));
        }
        let p = update
            .payload
            .ok_or_else(|| InstallError::Bundle("module update without a payload".into()))?;
        let encoding = match pb::PayloadEncoding::try_from(p.encoding) {
            Ok(pb::PayloadEncoding::FullZstd) => Encoding::FullZstd,
            Ok(pb::PayloadEncoding::BsdiffZstd) => Encoding::BsdiffZstd,
            _ => {
                return Err(InstallError::Bundle(format!(
                    "unknown payload encoding {}",
                    p.encoding
                )))
            }
        };
        let info = PayloadInfo {
            encoding,
            base_sha256: Some(p.base_sha256).filter(|b| !b.is_empty()),
            size: p.size,
            sha256: p.sha256,
        };
        installer.check_payload(&checked, &info)?;
        let receiving = Receiving::open(
            installer.modules(),
            &checked.manifest.module,
            &checked.manifest.version,
            &update.transfer_id,
            info,
        )?;
        Ok(Started::Receiving(checked, receiving))
    })
    .await
    .unwrap_or_else(|e| Err(InstallError::Bundle(format!("install task: {e}"))))
}

fn progress_of(r: &Receiving) -> pb::edge_message::Kind {
    pb::edge_message::Kind::Progress(pb::TransferProgress {
        transfer_id: r.record.transfer_id.clone(),
        module: r.record.module.clone(),
        offset: r.len(),
        size: r.info.size,
    })
}

/// NACKs `nonce` at `revision` with `error`.
async fn refuse(
    tx: &mpsc::Sender<pb::EdgeMessage>,
    nonce: String,
    revision: u64,
    error: String,
) -> Result<(), StreamError> {
    send_nack(tx, nonce, revision, error, false).await
}

/// NACKs `nonce`; `rolled_back`: the node installed it and went back on its own.
async fn send_nack(
    tx: &mpsc::Sender<pb::EdgeMessage>,
    nonce: String,
    revision: u64,
    error: String,
    rolled_back: bool,
) -> Result<(), StreamError> {
    metrics::counter!("aviary_edge_nacks_total").increment(1);
    send(
        tx,
        pb::edge_message::Kind::Nack(pb::Nack {
            nonce,
            revision,
            error,
            rolled_back,
        }),
    )
    .await
}

async fn nack(
    tx: &mpsc::Sender<pb::EdgeMessage>,
    nonce: String,
    revision: u64,
    module: &str,
    e: &InstallError,
) -> Result<(), StreamError> {
    tracing::warn!(module, revision, error = %e, "module update refused");
    let rolled_back = matches!(e, InstallError::RolledBack(_));
    send_nack(tx, nonce, revision, e.to_string(), rolled_back).await
}

/// Installed modules, their applied revisions and partial transfers, for the Hello.
fn module_report(
    installer: &Installer,
) -> (
    Vec<pb::ModuleStatus>,
    Vec<pb::AppliedRevision>,
    Vec<pb::PartialTransfer>,
) {
    let mut modules = Vec::new();
    let mut applied = Vec::new();
    match installer.modules().list() {
        Ok(list) => {
            for (name, state) in list {
                for (slot, which) in [(&state.current, "current"), (&state.previous, "previous")] {
                    if let Some(s) = slot {
                        let went_back = which == "current" && state.rolled_back;
                        modules.push(pb::ModuleStatus {
                            name: name.clone(),
                            version: s.version.clone(),
                            sha256: s.sha256.clone(),
                            state: if went_back {
                                pb::ModuleState::RolledBack
                            } else {
                                pb::ModuleState::Installed
                            } as i32,
                            slot: which.into(),
                            ..Default::default()
                        });
                    }
                }
                if state.revision > 0 {
                    applied.push(pb::AppliedRevision {
                        resource: Resource::Module(name.clone()).to_string(),
                        revision: state.revision,
                    });
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list installed modules"),
    }
    match installer.modules().configs() {
        Ok(configs) => {
            applied.extend(
                configs
                    .into_iter()
                    .map(|(name, revision)| pb::AppliedRevision {
                        resource: Resource::Config(name).to_string(),
                        revision,
                    }),
            )
        }
        Err(e) => tracing::warn!(error = %e, "could not list module configs"),
    }
    let partial = partial_transfers(installer.modules())
        .into_iter()
        .map(|(r, offset)| pb::PartialTransfer {
            transfer_id: r.transfer_id,
            module: r.module,
            to_version: r.to_version,
            offset,
        })
        .collect();
    (modules, applied, partial)
}
