//! How the CLI prints: aligned tables for people, JSON (grpcurl's field names) for scripts.

use std::collections::BTreeMap;

use aviary_proto::v1 as pb;
use serde_json::{json, Value};

use crate::Format;

/// Prints rows under a header, columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn sorted<V: Clone>(map: &std::collections::HashMap<String, V>) -> BTreeMap<String, V> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn pairs<V: std::fmt::Display + Clone>(map: &std::collections::HashMap<String, V>) -> String {
    let text: Vec<String> = sorted(map)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if text.is_empty() {
        "-".into()
    } else {
        text.join(",")
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let at = std::time::UNIX_EPOCH
                + std::time::Duration::new(secs, u32::try_from(t.nanos).unwrap_or(0));
            Some(humantime::format_rfc3339_millis(at).to_string())
        })
        .unwrap_or_default()
}

/// A node as JSON, with the names grpcurl prints.
pub(crate) fn node_json(n: &pb::Node) -> Value {
    json!({
        "nodeId": n.node_id,
        "labels": sorted(&n.labels),
        "connected": n.connected,
        "modules": n.modules.iter().map(|m| json!({
            "name": m.name, "version": m.version, "sha256": m.sha256, "state": m.state,
        })).collect::<Vec<_>>(),
        "weights": sorted(&n.weights),
        "arch": n.arch,
        "daemonVersion": n.daemon_version,
        "desiredRevision": n.desired_revision,
        "ackedRevision": n.acked_revision,
        "nackedRevision": n.nacked_revision,
        "nackError": n.nack_error,
        "lastSeen": time(&n.last_seen),
        "revoked": n.revoked,
        "moduleRollouts": n.module_rollouts.iter().map(module_rollout_json).collect::<Vec<_>>(),
        "configs": n.configs.iter().map(|c| json!({
            "module": c.module,
            "sources": c.sources.iter().collect::<BTreeMap<_, _>>(),
            "desiredRevision": c.desired_revision,
            "ackedRevision": c.acked_revision,
            "nackedRevision": c.nacked_revision,
            "nackError": c.nack_error,
        })).collect::<Vec<_>>(),
    })
}

/// One module on one node, with the names grpcurl prints.
fn module_rollout_json(m: &pb::ModuleRollout) -> Value {
    json!({
        "module": m.module,
        "desiredVersion": m.desired_version,
        "desiredRevision": m.desired_revision,
        "rollback": m.rollback,
        "ackedRevision": m.acked_revision,
        "nackedRevision": m.nacked_revision,
        "nackError": m.nack_error,
        "transfer": m.transfer.as_ref().map(|t| json!({
            "version": t.version, "encoding": t.encoding, "offset": t.offset, "size": t.size,
        })),
        "health": m.health.as_ref().map(|h| json!({
            "probeSuccesses": h.probe_successes, "probeFailures": h.probe_failures,
            "latencyP50Ms": h.latency_p50_ms, "latencyP99Ms": h.latency_p99_ms,
            "processState": h.process_state, "restarts": h.restarts,
            "logMatches": h.log_matches, "slot": h.slot, "version": h.version,
            "detail": h.detail,
        })),
    })
}

/// What a node does about one module, in a line: applied, refused (and why), or how far
/// its transfer has come.
fn module_rollout_line(m: &pb::ModuleRollout) -> String {
    let what = if m.rollback {
        format!("back to {}", m.desired_version)
    } else {
        m.desired_version.clone()
    };
    let state = if m.nacked_revision > 0 && m.nacked_revision >= m.desired_revision {
        format!("refused r{}: {}", m.nacked_revision, m.nack_error)
    } else if m.acked_revision >= m.desired_revision {
        "applied".to_owned()
    } else if let Some(t) = &m.transfer {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        format!(
            "receiving {} ({}): {:.1} of {:.1} MiB",
            t.version,
            t.encoding,
            mib(t.offset),
            mib(t.size)
        )
    } else {
        "pending".to_owned()
    };
    let health = m
        .health
        .as_ref()
        .map(|h| format!("; {} {}", h.process_state, h.version))
        .unwrap_or_default();
    format!("{what} r{} {state}{health}", m.desired_revision)
}

fn event_json(e: &pb::Event) -> Value {
    json!({
        "seq": e.seq, "time": time(&e.time), "actor": e.actor,
        "action": e.action, "target": e.target, "detail": e.detail,
    })
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub(crate) fn nodes(format: Format, nodes: &[pb::Node]) {
    match format {
        Format::Json => {
            print_json(&json!({ "nodes": nodes.iter().map(node_json).collect::<Vec<_>>() }))
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let state = if n.revoked {
                        "revoked"
                    } else if n.connected {
                        "connected"
                    } else {
                        "offline"
                    };
                    let sync = if n.nacked_revision == n.desired_revision && n.nacked_revision > 0 {
                        format!("nacked r{}", n.nacked_revision)
                    } else if n.acked_revision >= n.desired_revision {
                        format!("r{}", n.desired_revision)
                    } else {
                        format!("r{} (acked r{})", n.desired_revision, n.acked_revision)
                    };
                    vec![
                        n.node_id.clone(),
                        state.into(),
                        pairs(&n.labels),
                        pairs(&n.weights),
                        sync,
                    ]
                })
                .collect();
            table(&["NODE", "STATE", "LABELS", "WEIGHTS", "REVISION"], &rows);
        }
    }
}

pub(crate) fn node(format: Format, n: &pb::Node) {
    match format {
        Format::Json => print_json(&node_json(n)),
        Format::Table => {
            let rows = vec![
                vec!["node".into(), n.node_id.clone()],
                vec!["connected".into(), n.connected.to_string()],
                vec!["revoked".into(), n.revoked.to_string()],
                vec!["labels".into(), pairs(&n.labels)],
                vec!["weights".into(), pairs(&n.weights)],
                vec!["desired revision".into(), n.desired_revision.to_string()],
                vec!["acked revision".into(), n.acked_revision.to_string()],
                vec![
                    "nacked".into(),
                    if n.nacked_revision == 0 {
                        "-".into()
                    } else {
                        format!("r{}: {}", n.nacked_revision, n.nack_error)
                    },
                ],
                vec!["arch".into(), n.arch.clone()],
                vec!["daemon".into(), n.daemon_version.clone()],
                vec!["last seen".into(), time(&n.last_seen)],
            ];
            let mut rows = rows;
            for m in &n.module_rollouts {
                rows.push(vec![format!("module {}", m.module), module_rollout_line(m)]);
            }
            for c in &n.configs {
                let state = if c.nacked_revision > 0 && c.nacked_revision >= c.desired_revision {
                    format!("refused: {}", c.nack_error)
                } else if c.acked_revision >= c.desired_revision {
                    "applied".into()
                } else {
                    "pending".into()
                };
                rows.push(vec![
                    format!("config {}", c.module),
                    format!(
                        "r{} {state}; layers: {}",
                        c.desired_revision,
                        c.layers.join(" → ")
                    ),
                ]);
            }
            table(&["FIELD", "VALUE"], &rows);
        }
    }
}

pub(crate) fn set_weight(format: Format, module: &str, weight: u32, r: &pb::SetWeightResponse) {
    match format {
        Format::Json => print_json(&json!({ "nodeIds": r.node_ids, "eventSeq": r.event_seq })),
        Format::Table => println!(
            "{module} weight {weight} on {} node(s) now matching (audit #{}): {}",
            r.node_ids.len(),
            r.event_seq,
            r.node_ids.join(" ")
        ),
    }
}

pub(crate) fn revoke(format: Format, id: &str, r: &pb::RevokeNodeResponse) {
    match format {
        Format::Json => print_json(&json!({ "nodeId": id, "disconnected": r.disconnected })),
        Format::Table => println!(
            "node {id} revoked{}",
            if r.disconnected {
                "; its stream was cut"
            } else {
                ""
            }
        ),
    }
}

fn event_row(e: &pb::Event) -> Vec<String> {
    vec![
        e.seq.to_string(),
        time(&e.time),
        e.actor.clone(),
        e.action.clone(),
        e.target.clone(),
        e.detail.clone(),
    ]
}

pub(crate) fn events(format: Format, events: &[pb::Event]) {
    match format {
        Format::Json => {
            print_json(&json!({ "events": events.iter().map(event_json).collect::<Vec<_>>() }))
        }
        Format::Table => table(
            &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
            &events.iter().map(event_row).collect::<Vec<_>>(),
        ),
    }
}

pub(crate) fn event_line(format: Format, e: &pb::Event) {
    match format {
        Format::Json => println!("{}", event_json(e)),
        Format::Table => println!("{}", event_row(e).join("  ")),
    }
}

/// A release as JSON, with the names grpcurl prints (bytes fields omitted).
fn release_json(r: &pb::Release) -> Value {
    json!({
        "module": r.module,
        "version": r.version,
        "sha256": r.sha256,
        "size": r.size,
        "target": r.target,
        "runnable": r.runnable,
        "createdAt": time(&r.created_at),
        "attachments": r.attachments,
        "artifacts": r.artifacts.iter().map(|a| json!({
            "target": a.target, "sha256": a.sha256, "size": a.size,
        })).collect::<Vec<_>>(),
    })
}

fn release_row(r: &pb::Release) -> Vec<String> {
    let targets: Vec<&str> = r.artifacts.iter().map(|a| a.target.as_str()).collect();
    vec![
        r.module.clone(),
        r.version.clone(),
        targets.join(","),
        r.size.to_string(),
        r.sha256.chars().take(12).collect(),
        if r.runnable { "service" } else { "file" }.into(),
        if r.attachments.is_empty() {
            "-".into()
        } else {
            r.attachments.join(",")
        },
        time(&r.created_at),
    ]
}

const RELEASE_HEADER: [&str; 8] = [
    "MODULE",
    "VERSION",
    "TARGETS",
    "SIZE",
    "SHA256",
    "KIND",
    "ATTACHMENTS",
    "CREATED",
];

pub(crate) fn releases(format: Format, releases: &[pb::Release]) {
    match format {
        Format::Json => print_json(
            &json!({ "releases": releases.iter().map(release_json).collect::<Vec<_>>() }),
        ),
        Format::Table => table(
            &RELEASE_HEADER,
            &releases.iter().map(release_row).collect::<Vec<_>>(),
        ),
    }
}

pub(crate) fn release(format: Format, r: &pb::Release) {
    match format {
        Format::Json => print_json(&release_json(r)),
        Format::Table => table(&RELEASE_HEADER, &[release_row(r)]),
    }
}

/// `ROLLOUT_STATE_X` without its prefix.
pub(crate) fn state_name(state: i32) -> &'static str {
    rollout_state(state).trim_start_matches("ROLLOUT_STATE_")
}

fn rollout_state(state: i32) -> &'static str {
    match pb::RolloutState::try_from(state) {
        Ok(pb::RolloutState::Progressing) => "ROLLOUT_STATE_PROGRESSING",
        Ok(pb::RolloutState::Paused) => "ROLLOUT_STATE_PAUSED",
        Ok(pb::RolloutState::Succeeded) => "ROLLOUT_STATE_SUCCEEDED",
        Ok(pb::RolloutState::Aborted) => "ROLLOUT_STATE_ABORTED",
        Ok(pb::RolloutState::Failed) => "ROLLOUT_STATE_FAILED",
        _ => "ROLLOUT_STATE_UNSPECIFIED",
    }
}

pub(crate) fn rollouts(format: Format, rollouts: &[pb::Rollout]) {
    let progress = |r: &pb::Rollout| r.progress.unwrap_or_default();
    match format {
        Format::Json => {
            let list: Vec<Value> = rollouts
                .iter()
                .map(|r| {
                    let p = progress(r);
                    json!({
                        "id": r.id, "module": r.module, "version": r.version,
                        "selector": r.selector, "state": rollout_state(r.state),
                        "currentStep": r.current_step, "message": r.message,
                        "createdAt": time(&r.created_at), "updatedAt": time(&r.updated_at),
                        "progress": {"selected": p.selected, "installed": p.installed, "failed": p.failed},
                    })
                })
                .collect();
            print_json(&json!({ "rollouts": list }));
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = rollouts
                .iter()
                .map(|r| {
                    let p = progress(r);
                    vec![
                        r.id.clone(),
                        r.module.clone(),
                        r.version.clone(),
                        if r.selector.is_empty() {
                            "*".into()
                        } else {
                            r.selector.clone()
                        },
                        rollout_state(r.state)
                            .trim_start_matches("ROLLOUT_STATE_")
                            .to_owned(),
                        format!("{}/{}", p.installed, p.selected),
                        p.failed.to_string(),
                        r.message.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "MODULE",
                    "VERSION",
                    "SELECTOR",
                    "STATE",
                    "INSTALLED",
                    "FAILED",
                    "MESSAGE",
                ],
                &rows,
            );
        }
    }
}

/// One line per rollout change (`aviary rollout watch`), JSON lines for scripts; `live`
/// redraws the line in place (a terminal).
pub(crate) fn rollout_line(format: Format, r: &pb::Rollout, live: bool) {
    let p = r.progress.unwrap_or_default();
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "id": r.id, "state": rollout_state(r.state), "currentStep": r.current_step,
                "steps": r.steps.len(), "message": r.message,
                "progress": {"selected": p.selected, "canaries": p.canaries,
                             "installed": p.installed, "failed": p.failed},
            })
        ),
        Format::Table if live => {
            use std::io::Write;
            print!(
                "\r\x1b[2K{} step {}/{} canaries {}/{} installed {} failed {}  {}",
                rollout_state(r.state).trim_start_matches("ROLLOUT_STATE_"),
                (r.current_step as usize + 1).min(r.steps.len().max(1)),
                r.steps.len(),
                p.canaries,
                p.selected,
                p.installed,
                p.failed,
                r.message.chars().take(80).collect::<String>()
            );
            let _ = std::io::stdout().flush();
        }
        Format::Table => println!(
            "{} {} step {}/{} canaries {}/{} installed {} failed {}  {}",
            time(&r.updated_at),
            rollout_state(r.state).trim_start_matches("ROLLOUT_STATE_"),
            (r.current_step as usize + 1).min(r.steps.len().max(1)),
            r.steps.len(),
            p.canaries,
            p.selected,
            p.installed,
            p.failed,
            r.message
        ),
    }
}
