//! How the CLI prints: aligned tables for people, JSON (grpcurl's field names) for scripts.

use std::collections::BTreeMap;

use crate::json::{self, Contract};
use crate::Format;
use aviary_proto::v1 as pb;

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

/// Prints `msg` as JSON or YAML; `false` when `format` is one the caller prints itself.
pub(crate) fn structured<M: Contract>(format: Format, msg: &M) -> anyhow::Result<bool> {
    let text = match format {
        Format::Json => json::pretty(msg)?,
        Format::Yaml => json::yaml(msg)?,
        Format::Table | Format::Wide | Format::Name => return Ok(false),
    };
    println!("{}", text.trim_end());
    Ok(true)
}

/// Prints `names` one per line (`-o name`, as kubectl: `kind/name`).
fn names<'a>(kind: &str, names: impl IntoIterator<Item = &'a str>) {
    for n in names {
        println!("{kind}/{n}");
    }
}

fn module_state(state: i32) -> String {
    pb::ModuleState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("MODULE_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn health_word(h: i32) -> String {
    pb::Health::try_from(h)
        .ok()
        .filter(|h| *h != pb::Health::Unspecified)
        .map_or("unknown".into(), |h| {
            h.as_str_name()
                .trim_start_matches("HEALTH_")
                .to_ascii_lowercase()
        })
}

/// Each module a node runs, at a glance: `app 1.2.0 healthy`.
fn modules_cell(n: &pb::Node) -> String {
    let cells: Vec<String> = n
        .modules
        .iter()
        .map(|m| {
            let state = module_state(m.state);
            let word = health_word(m.health);
            // The state only when it says more than the health word does.
            if state == "running" || state == "installed" {
                format!("{} {} {word}", m.name, m.version)
            } else {
                format!("{} {} {word} ({state})", m.name, m.version)
            }
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(", ")
    }
}

/// `nodes list`.
pub(crate) fn nodes(format: Format, nodes: Vec<pb::Node>) -> anyhow::Result<()> {
    let list = pb::ListNodesResponse {
        nodes,
        next_page_token: String::new(),
    };
    if structured(format, &list)? {
        return Ok(());
    }
    let nodes = list.nodes;
    if format == Format::Name {
        names("node", nodes.iter().map(|n| n.node_id.as_str()));
        return Ok(());
    }
    let wide = format == Format::Wide;
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
            let mut row = vec![
                n.node_id.clone(),
                state.into(),
                modules_cell(n),
                pairs(&n.labels),
            ];
            if wide {
                let sync = if n.nacked_revision == n.desired_revision && n.nacked_revision > 0 {
                    format!("nacked r{}", n.nacked_revision)
                } else if n.acked_revision >= n.desired_revision {
                    format!("r{}", n.desired_revision)
                } else {
                    format!("r{} (acked r{})", n.desired_revision, n.acked_revision)
                };
                row.extend([
                    pairs(&n.weights),
                    sync,
                    n.arch.clone(),
                    n.daemon_version.clone(),
                    time(&n.last_heartbeat),
                ]);
            }
            row
        })
        .collect();
    if wide {
        table(
            &[
                "NODE",
                "STATE",
                "MODULES",
                "LABELS",
                "WEIGHTS",
                "REVISION",
                "ARCH",
                "DAEMON",
                "HEARTBEAT",
            ],
            &rows,
        );
    } else {
        table(&["NODE", "STATE", "MODULES", "LABELS"], &rows);
    }
    Ok(())
}

/// `nodes get`.
pub(crate) fn node(format: Format, n: &pb::Node) -> anyhow::Result<()> {
    if structured(format, n)? {
        return Ok(());
    }
    if format == Format::Name {
        names("node", [n.node_id.as_str()]);
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = vec![
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
        vec!["last heartbeat".into(), time(&n.last_heartbeat)],
    ];
    for m in &n.modules {
        let previous = if m.previous_version.is_empty() {
            String::new()
        } else {
            format!("; previous {}", m.previous_version)
        };
        rows.push(vec![
            format!("runs {}", m.name),
            format!(
                "{} {} since {}, {}; sha256 {}; slot {}{previous}",
                m.version,
                module_state(m.state),
                time(&m.since),
                health_word(m.health),
                m.sha256.chars().take(12).collect::<String>(),
                m.slot,
            ),
        ]);
    }
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
    Ok(())
}

/// `nodes set-weight`.
pub(crate) fn set_weight(
    format: Format,
    module: &str,
    weight: u32,
    r: &pb::SetWeightResponse,
) -> anyhow::Result<()> {
    if structured(format, r)? {
        return Ok(());
    }
    if format == Format::Name {
        names("node", r.node_ids.iter().map(String::as_str));
        return Ok(());
    }
    println!(
        "{module} weight {weight} on {} node(s) now matching (audit #{}): {}",
        r.node_ids.len(),
        r.event_seq,
        r.node_ids.join(" ")
    );
    Ok(())
}

/// `nodes revoke`.
pub(crate) fn revoke(format: Format, id: &str, r: &pb::RevokeNodeResponse) -> anyhow::Result<()> {
    if structured(format, r)? {
        return Ok(());
    }
    if format == Format::Name {
        names("node", [id]);
        return Ok(());
    }
    println!(
        "node {id} revoked{}",
        if r.disconnected {
            "; its stream was cut"
        } else {
            ""
        }
    );
    Ok(())
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

/// `events` (the whole log, or what a filter keeps).
pub(crate) fn events(format: Format, events: Vec<pb::Event>) -> anyhow::Result<()> {
    let list = pb::ListEventsResponse {
        events,
        ..Default::default()
    };
    if structured(format, &list)? {
        return Ok(());
    }
    if format == Format::Name {
        for e in &list.events {
            println!("event/{}", e.seq);
        }
        return Ok(());
    }
    table(
        &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        &list.events.iter().map(event_row).collect::<Vec<_>>(),
    );
    Ok(())
}

/// `events --follow`: one line per event (a JSON object per line for scripts).
pub(crate) fn event_line(format: Format, e: &pb::Event) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", json::line(e)?),
        Format::Yaml => println!("---\n{}", json::yaml(e)?.trim_end()),
        Format::Name => println!("event/{}", e.seq),
        Format::Table | Format::Wide => println!("{}", event_row(e).join("  ")),
    }
    Ok(())
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

/// `release list`.
pub(crate) fn releases(format: Format, releases: Vec<pb::Release>) -> anyhow::Result<()> {
    let list = pb::ListReleasesResponse {
        releases,
        next_page_token: String::new(),
    };
    if structured(format, &list)? {
        return Ok(());
    }
    if format == Format::Name {
        for r in &list.releases {
            println!("release/{}/{}", r.module, r.version);
        }
        return Ok(());
    }
    table(
        &RELEASE_HEADER,
        &list.releases.iter().map(release_row).collect::<Vec<_>>(),
    );
    Ok(())
}

/// `release get` and `release upload`.
pub(crate) fn release(format: Format, r: &pb::Release) -> anyhow::Result<()> {
    if structured(format, r)? {
        return Ok(());
    }
    if format == Format::Name {
        println!("release/{}/{}", r.module, r.version);
        return Ok(());
    }
    table(&RELEASE_HEADER, &[release_row(r)]);
    Ok(())
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

/// `rollout list`.
pub(crate) fn rollouts(format: Format, rollouts: Vec<pb::Rollout>) -> anyhow::Result<()> {
    let list = pb::ListRolloutsResponse {
        rollouts,
        next_page_token: String::new(),
    };
    if structured(format, &list)? {
        return Ok(());
    }
    if format == Format::Name {
        names("rollout", list.rollouts.iter().map(|r| r.id.as_str()));
        return Ok(());
    }
    let wide = format == Format::Wide;
    let rows: Vec<Vec<String>> = list
        .rollouts
        .iter()
        .map(|r| {
            let p = r.progress.unwrap_or_default();
            let mut row = vec![
                r.id.clone(),
                r.module.clone(),
                r.version.clone(),
                if r.selector.is_empty() {
                    "*".into()
                } else {
                    r.selector.clone()
                },
                state_name(r.state).to_owned(),
                format!("{}/{}", p.installed, p.selected),
                p.failed.to_string(),
            ];
            if wide {
                row.extend([
                    step_cell(r),
                    format!("{}/{}", p.healthy, p.canaries),
                    time(&r.created_at),
                ]);
            }
            row.push(r.message.clone());
            row
        })
        .collect();
    let mut header = vec![
        "ID",
        "MODULE",
        "VERSION",
        "SELECTOR",
        "STATE",
        "INSTALLED",
        "FAILED",
    ];
    if wide {
        header.extend(["STEP", "HEALTHY", "CREATED"]);
    }
    header.push("MESSAGE");
    table(&header, &rows);
    Ok(())
}

fn step_cell(r: &pb::Rollout) -> String {
    if r.steps.is_empty() {
        "-".into()
    } else {
        format!(
            "{}/{}",
            (r.current_step as usize + 1).min(r.steps.len()),
            r.steps.len()
        )
    }
}

/// One rollout (`rollout get`, `create` and the actions): the rollout, then its steps.
pub(crate) fn rollout(format: Format, r: &pb::Rollout) -> anyhow::Result<()> {
    if structured(format, r)? {
        return Ok(());
    }
    if format == Format::Name {
        names("rollout", [r.id.as_str()]);
        return Ok(());
    }
    let p = r.progress.unwrap_or_default();
    let mut rows: Vec<Vec<String>> = vec![
        vec!["id".into(), r.id.clone()],
        vec!["release".into(), format!("{} {}", r.module, r.version)],
        vec![
            "selector".into(),
            if r.selector.is_empty() {
                "*".into()
            } else {
                r.selector.clone()
            },
        ],
        vec!["state".into(), state_name(r.state).to_owned()],
        vec!["message".into(), r.message.clone()],
        vec![
            "nodes".into(),
            format!(
                "{} selected, {} canaries, {} installed, {} healthy, {} failed",
                p.selected, p.canaries, p.installed, p.healthy, p.failed
            ),
        ],
        vec!["created".into(), time(&r.created_at)],
        vec!["updated".into(), time(&r.updated_at)],
    ];
    for (i, step) in r.steps.iter().enumerate() {
        let mark = if i as u32 == r.current_step && !r.steps.is_empty() {
            "→"
        } else {
            " "
        };
        rows.push(vec![format!("{mark} step {}", i + 1), step_text(step)]);
    }
    table(&["FIELD", "VALUE"], &rows);
    Ok(())
}

/// A step as the `--step` flag spells it.
fn step_text(step: &pb::Step) -> String {
    use pb::step::Kind;
    match &step.kind {
        Some(Kind::SetCanaryScale(c)) => format!("canary={}%", c.percent),
        Some(Kind::SetWeight(w)) => format!("weight={}", w.weight),
        Some(Kind::Pause(p)) if p.seconds == 0 => "pause".into(),
        Some(Kind::Pause(p)) => format!("pause={}s", p.seconds),
        Some(Kind::Analysis(a)) => format!("analysis={}s", a.window_seconds),
        None => "?".into(),
    }
}

/// One line per rollout change (`aviary rollout watch`), JSON lines for scripts; `live`
/// redraws the line in place (a terminal).
pub(crate) fn rollout_line(format: Format, r: &pb::Rollout, live: bool) -> anyhow::Result<()> {
    let p = r.progress.unwrap_or_default();
    match format {
        Format::Json => println!("{}", json::line(r)?),
        Format::Yaml => println!("---\n{}", json::yaml(r)?.trim_end()),
        Format::Name => println!("rollout/{}", r.id),
        Format::Table | Format::Wide if live => {
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
        Format::Table | Format::Wide => println!(
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
    Ok(())
}
