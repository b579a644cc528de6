//! Domain values into proto messages (and the few requests that need more than a field
//! copy back into domain values). With `wire.rs`, the only place these two meet.

use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;

use crate::audit::{now_ms, Event, EventFilter};
use crate::error::ControlPlaneError;
use crate::health::Health;
use crate::inventory::{InstalledModule, RunState};
use crate::layers::{ConfigLayer, Scope};
use crate::node::{HealthRecord, NodeStatus};
use crate::registry::{NodeConfigView, NodeView, NodeWeights};
use crate::release::ReleaseRecord;

/// `GetNode`'s answer.
pub(crate) fn node(v: NodeView) -> pb::Node {
    let rollouts = module_rollouts(&v);
    let configs = v
        .configs
        .iter()
        .map(|(module, c)| {
            node_config(NodeConfigView {
                node_id: v.record.node_id.clone(),
                module: module.clone(),
                config: Some(c.clone()),
                answers: v.status.configs.get(module).cloned(),
            })
        })
        .collect();
    let now = v.connected.then(now_ms);
    let modules = v
        .status
        .inventory
        .modules()
        .iter()
        .map(|(name, m)| {
            let report = v.status.modules.get(name).and_then(|p| p.health.as_ref());
            module_status(name, m, Health::of(report, now))
        })
        .collect();
    let NodeView {
        record: r,
        status,
        weights,
        connected,
        ..
    } = v;
    pb::Node {
        node_id: r.node_id,
        labels: r.labels.into_iter().collect(),
        connected,
        modules,
        weights: weights.weights.into_iter().collect(),
        arch: r.arch,
        daemon_version: r.daemon_version,
        desired_revision: weights.revision,
        acked_revision: status.acked_revision,
        nacked_revision: status.nacked.as_ref().map_or(0, |n| n.revision),
        nack_error: status.nacked.map(|n| n.error).unwrap_or_default(),
        last_seen: (status.last_seen_ms > 0).then(|| timestamp(status.last_seen_ms)),
        last_heartbeat: (status.last_heartbeat_ms > 0).then(|| timestamp(status.last_heartbeat_ms)),
        revoked: r.revoked,
        claimed_labels: r.claimed_labels.into_iter().collect(),
        enrolled_via: r.enrolled.map(|e| e.via.to_string()).unwrap_or_default(),
        module_rollouts: rollouts,
        configs,
    }
}

fn module_status(name: &str, m: &InstalledModule, health: Health) -> pb::ModuleStatus {
    let previous = m.previous.as_ref();
    pb::ModuleStatus {
        name: name.to_owned(),
        version: m.current.version.clone(),
        sha256: m.current.sha256.clone(),
        state: run_state(m.state) as i32,
        slot: if m.on_previous { "previous" } else { "current" }.into(),
        since: (m.since_ms > 0).then(|| timestamp(m.since_ms)),
        previous_version: previous.map(|p| p.version.clone()).unwrap_or_default(),
        previous_sha256: previous.map(|p| p.sha256.clone()).unwrap_or_default(),
        health: health_word(health) as i32,
    }
}

fn run_state(s: RunState) -> pb::ModuleState {
    match s {
        RunState::Installed => pb::ModuleState::Installed,
        RunState::Starting => pb::ModuleState::Starting,
        RunState::Running => pb::ModuleState::Running,
        RunState::Stopped => pb::ModuleState::Stopped,
        RunState::Failed => pb::ModuleState::Failed,
        RunState::RolledBack => pb::ModuleState::RolledBack,
    }
}

/// The proto value of a health word.
pub(crate) fn health_word(h: Health) -> pb::Health {
    match h {
        Health::Healthy => pb::Health::Healthy,
        Health::Degraded => pb::Health::Degraded,
        Health::Failing => pb::Health::Failing,
        Health::Unknown => pb::Health::Unknown,
    }
}

/// Per module the node runs, is meant to run or answered about: desired and answered.
fn module_rollouts(v: &NodeView) -> Vec<pb::ModuleRollout> {
    let status: &NodeStatus = &v.status;
    let mut names: Vec<&String> = v.modules.keys().chain(status.modules.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|m| {
            let d = v.modules.get(m);
            let p = status.modules.get(m);
            let nacked = p.and_then(|p| p.nacked.as_ref());
            pb::ModuleRollout {
                module: m.clone(),
                desired_version: d.map(|d| d.version.clone()).unwrap_or_default(),
                desired_revision: d.map_or(0, |d| d.revision),
                rollback: d.is_some_and(|d| d.rollback),
                acked_revision: p.map_or(0, |p| p.acked_revision),
                nacked_revision: nacked.map_or(0, |n| n.revision),
                nack_error: nacked.map(|n| n.error.clone()).unwrap_or_default(),
                transfer: p
                    .and_then(|p| p.transfer.as_ref())
                    .map(|t| pb::TransferStatus {
                        version: t.version.clone(),
                        encoding: t.encoding.clone(),
                        offset: t.offset,
                        size: t.size,
                    }),
                health: p
                    .and_then(|p| p.health.as_ref())
                    .map(|h| module_health(m, h)),
            }
        })
        .collect()
}

fn module_health(module: &str, h: &HealthRecord) -> pb::ModuleHealth {
    pb::ModuleHealth {
        module: module.to_owned(),
        probe_successes: h.probe_successes,
        probe_failures: h.probe_failures,
        latency_p50_ms: h.latency_p50_ms,
        latency_p99_ms: h.latency_p99_ms,
        process_state: h.process_state.clone(),
        restarts: h.restarts,
        log_matches: h.log_matches,
        slot: h.slot.clone(),
        version: h.version.clone(),
        detail: h.detail.clone(),
    }
}

/// A `WatchWeights` update.
pub(crate) fn node_weights(w: NodeWeights) -> pb::NodeWeights {
    pb::NodeWeights {
        node_id: w.node_id,
        revision: w.revision,
        weights: w.weights.into_iter().collect(),
        connected: w.connected,
    }
}

/// `GetNodeConfig`'s answer: the merge and where each value came from.
pub(crate) fn node_config(v: NodeConfigView) -> pb::NodeConfig {
    let nacked = v.answers.as_ref().and_then(|a| a.nacked.as_ref());
    let (nacked_revision, nack_error) =
        nacked.map_or((0, String::new()), |n| (n.revision, n.error.clone()));
    let acked_revision = v.answers.as_ref().map_or(0, |a| a.acked_revision);
    match v.config {
        Some(c) => pb::NodeConfig {
            module: v.module,
            node_id: v.node_id,
            overlay: Some(c.overlay.to_proto()),
            sources: c.sources.into_iter().collect(),
            desired_revision: c.revision,
            acked_revision,
            nacked_revision,
            nack_error,
            layers: c.layers,
        },
        None => pb::NodeConfig {
            module: v.module,
            node_id: v.node_id,
            overlay: Some(pb::RunOverlay::default()),
            ..Default::default()
        },
    }
}

/// A request's `ConfigScope` (neither field set = the base).
pub(crate) fn scope_from(s: Option<pb::ConfigScope>) -> Result<Scope, ControlPlaneError> {
    let s = s.unwrap_or_default();
    Scope::parse(&s.selector, &s.node_id)
}

fn scope(s: &Scope) -> pb::ConfigScope {
    match s {
        Scope::Base => pb::ConfigScope::default(),
        Scope::Selector(s) => pb::ConfigScope {
            selector: s.to_string(),
            node_id: String::new(),
        },
        Scope::Node(id) => pb::ConfigScope {
            selector: String::new(),
            node_id: id.clone(),
        },
    }
}

/// A live config layer.
pub(crate) fn config_layer(l: &ConfigLayer) -> pb::ConfigLayer {
    pb::ConfigLayer {
        module: l.module.clone(),
        scope: Some(scope(&l.scope)),
        overlay: l.overlay.as_ref().map(RunOverlay::to_proto),
        version: l.version,
        name: l.scope.to_string(),
    }
}

/// A release; the top-level artifact fields describe the first target.
pub(crate) fn release(r: &ReleaseRecord) -> pb::Release {
    let artifacts: Vec<pb::Artifact> = r
        .artifacts
        .iter()
        .map(|(target, a)| pb::Artifact {
            target: target.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
            manifest: a.manifest.clone(),
            signature: a.signature.clone(),
        })
        .collect();
    let first = artifacts.first().cloned().unwrap_or_default();
    pb::Release {
        module: r.module.clone(),
        version: r.version.clone(),
        sha256: first.sha256,
        size: first.size,
        target: first.target,
        manifest: first.manifest,
        signature: first.signature,
        created_at: Some(prost_types::Timestamp::from(r.created_at)),
        attachments: r.attachments.keys().cloned().collect(),
        artifacts,
        runnable: r.artifacts.values().any(|a| a.runnable),
    }
}

/// An audit event.
pub(crate) fn event(e: Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: Some(timestamp(e.time_ms)),
        actor: e.actor,
        action: e.action,
        target: e.target,
        detail: e.detail,
    }
}

/// A query's `EventFilter`; empty fields match everything.
pub(crate) fn event_filter(f: Option<pb::EventFilter>) -> EventFilter {
    let f = f.unwrap_or_default();
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    EventFilter {
        node_id: nonempty(f.node_id),
        rollout_id: nonempty(f.rollout_id),
        actor: nonempty(f.actor),
        action: nonempty(f.action),
        since_ms: f.since.map(|t| millis(&t)),
        until_ms: f.until.map(|t| millis(&t)),
    }
}

/// Unix milliseconds as a protobuf timestamp.
pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as Unix milliseconds (before 1970 = 0).
pub(crate) fn millis(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}
