//! Audit events: the append-only record of admin actions, refused calls and (later)
//! rollout transitions, and the filter operators query it with.

use std::time::{SystemTime, UNIX_EPOCH};

/// An audit event before the store gives it a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NewEvent {
    /// Who: `admin/alice`, `edge/gw-1`, `peer/127.0.0.1:5000`, `control-plane`.
    pub actor: String,
    /// What: `nodes.set_weight`, `auth.denied`, ...
    pub action: String,
    /// On what: `node/gw-1`, `module/gateway`.
    pub target: String,
    /// Free text with the numbers behind the action.
    pub detail: String,
}

impl NewEvent {
    /// Shorthand constructor.
    pub(crate) fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        detail: impl Into<String>,
    ) -> NewEvent {
        NewEvent {
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
        }
    }
}

/// A stored audit event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Event {
    /// Gap-free, increasing from 1.
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// See `NewEvent::actor`.
    pub actor: String,
    /// See `NewEvent::action`.
    pub action: String,
    /// See `NewEvent::target`.
    pub target: String,
    /// See `NewEvent::detail`.
    pub detail: String,
}

impl Event {
    /// Stamps a new event with its sequence number and the current time.
    pub(crate) fn stamp(seq: u64, new: NewEvent) -> Event {
        Event {
            seq,
            time_ms: now_ms(),
            actor: new.actor,
            action: new.action,
            target: new.target,
            detail: new.detail,
        }
    }
}

/// Which events a query wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct EventFilter {
    /// Events by or about this node.
    pub node_id: Option<String>,
    /// Events about this rollout.
    pub rollout_id: Option<String>,
    /// Events by this actor (exact).
    pub actor: Option<String>,
    /// Actions starting with this prefix (`nodes.`, `auth.denied`).
    pub action: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<u64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<u64>,
}

impl EventFilter {
    /// True when `e` passes every set field.
    pub(crate) fn matches(&self, e: &Event) -> bool {
        let node_ok = self
            .node_id
            .as_ref()
            .is_none_or(|id| e.target == format!("node/{id}") || e.actor == format!("edge/{id}"));
        let rollout_ok = self
            .rollout_id
            .as_ref()
            .is_none_or(|id| e.target == format!("rollout/{id}"));
        node_ok
            && rollout_ok
            && self.actor.as_ref().is_none_or(|a| &e.actor == a)
            && self
                .action
                .as_ref()
                .is_none_or(|a| e.action.starts_with(a.as_str()))
            && self.since_ms.is_none_or(|t| e.time_ms >= t)
            && self.until_ms.is_none_or(|t| e.time_ms < t)
    }
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
