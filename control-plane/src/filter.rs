//! `ListNodes` filters on what a node runs and how it is doing, in the AIP-160 style:
//! comparisons joined by `AND`, e.g. `connected = true AND modules.app.version = 1.2.0`.
//!
//! Fields: `connected` (true, false); `modules.NAME.version`; `modules.NAME.state`
//! (installed, starting, running, stopped, failed, rolled_back); `modules.NAME.health`
//! (healthy, degraded, failing, unknown). `NAME` may be `*`: any module. Operators `=`
//! and `!=`; a node without the module matches neither. Values may be double-quoted.

use std::fmt;

use crate::error::ControlPlaneError;
use crate::health::Health;
use crate::inventory::{InstalledModule, Inventory, RunState};
use crate::node::NodeStatus;

/// Longest filter accepted.
const MAX_LEN: usize = 1024;

/// What a comparison looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Field {
    Connected,
    Version(String),
    State(String),
    Health(String),
}

/// One comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Comparison {
    field: Field,
    equal: bool,
    value: String,
}

/// A parsed filter; the empty filter matches every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeFilter {
    terms: Vec<Comparison>,
}

/// What a filter is matched against: one node now.
pub(crate) struct Subject<'a> {
    /// A live stream is attached.
    pub connected: bool,
    /// Its answers, inventory and latest reports.
    pub status: &'a NodeStatus,
    /// Unix ms now (health words age).
    pub now_ms: u64,
}

fn bad(message: String) -> ControlPlaneError {
    ControlPlaneError::BadField {
        field: "filter".into(),
        message,
    }
}

const STATES: [(&str, RunState); 6] = [
    ("installed", RunState::Installed),
    ("starting", RunState::Starting),
    ("running", RunState::Running),
    ("stopped", RunState::Stopped),
    ("failed", RunState::Failed),
    ("rolled_back", RunState::RolledBack),
];

const HEALTH: [Health; 4] = [
    Health::Healthy,
    Health::Degraded,
    Health::Failing,
    Health::Unknown,
];

impl NodeFilter {
    /// Parses `text`; the error names the `filter` field and what is wrong.
    pub(crate) fn parse(text: &str) -> Result<NodeFilter, ControlPlaneError> {
        if text.len() > MAX_LEN {
            return Err(bad(format!("filter longer than {MAX_LEN} bytes")));
        }
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(NodeFilter { terms });
        }
        for term in text.split(" AND ") {
            terms.push(comparison(term.trim())?);
        }
        Ok(NodeFilter { terms })
    }

    /// Whether every comparison holds for `node`.
    pub(crate) fn matches(&self, node: &Subject<'_>) -> bool {
        self.terms.iter().all(|t| t.holds(node))
    }
}

fn comparison(term: &str) -> Result<Comparison, ControlPlaneError> {
    let (lhs, equal, rhs) = if let Some((l, r)) = term.split_once("!=") {
        (l, false, r)
    } else if let Some((l, r)) = term.split_once('=') {
        (l, true, r)
    } else {
        return Err(bad(format!(
            "{term:?} is not a comparison (FIELD = VALUE or FIELD != VALUE, joined by AND)"
        )));
    };
    let (lhs, rhs) = (lhs.trim(), rhs.trim());
    let value = rhs
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(rhs);
    if value.is_empty() || value.contains(char::is_whitespace) && value.len() == rhs.len() {
        return Err(bad(format!(
            "{term:?}: the value must be one word or quoted"
        )));
    }
    let field = match lhs.split('.').collect::<Vec<_>>()[..] {
        ["connected"] => {
            if value != "true" && value != "false" {
                return Err(bad(format!("connected is true or false, not {value:?}")));
            }
            Field::Connected
        }
        ["modules", name, what] if !name.is_empty() => {
            let name = name.to_owned();
            match what {
                "version" => Field::Version(name),
                "state" => {
                    if !STATES.iter().any(|(s, _)| *s == value) {
                        return Err(bad(format!(
                            "{value:?} is not a module state (installed, starting, running, stopped, failed, rolled_back)"
                        )));
                    }
                    Field::State(name)
                }
                "health" => {
                    if !HEALTH.iter().any(|h| h.as_str() == value) {
                        return Err(bad(format!(
                            "{value:?} is not a health word (healthy, degraded, failing, unknown)"
                        )));
                    }
                    Field::Health(name)
                }
                _ => return Err(unknown_field(lhs)),
            }
        }
        _ => return Err(unknown_field(lhs)),
    };
    Ok(Comparison {
        field,
        equal,
        value: value.to_owned(),
    })
}

fn unknown_field(lhs: &str) -> ControlPlaneError {
    bad(format!(
        "unknown field {lhs:?} (connected, modules.NAME.version, modules.NAME.state, modules.NAME.health; NAME may be *)"
    ))
}

impl Comparison {
    fn holds(&self, node: &Subject<'_>) -> bool {
        let inventory: &Inventory = &node.status.inventory;
        fn modules<'a>(
            inventory: &'a Inventory,
            name: &'a str,
        ) -> impl Iterator<Item = (&'a String, &'a InstalledModule)> {
            inventory
                .modules()
                .iter()
                .filter(move |(n, _)| name == "*" || n.as_str() == name)
        }
        let modules = |name| modules(inventory, name);
        let compare = |found: &str| (found == self.value) == self.equal;
        match &self.field {
            Field::Connected => compare(if node.connected { "true" } else { "false" }),
            Field::Version(name) => modules(name).any(|(_, m)| compare(&m.current.version)),
            Field::State(name) => modules(name).any(|(_, m)| {
                compare(
                    STATES
                        .iter()
                        .find(|(_, s)| *s == m.state)
                        .map_or("", |(w, _)| w),
                )
            }),
            Field::Health(name) => modules(name).any(|(n, _)| {
                let report = node.status.modules.get(n).and_then(|p| p.health.as_ref());
                let now = node.connected.then_some(node.now_ms);
                compare(Health::of(report, now).as_str())
            }),
        }
    }
}

impl fmt::Display for NodeFilter {
    /// The canonical form (what a page token is bound to).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" AND ")?;
            }
            let (field, name) = match &t.field {
                Field::Connected => ("connected", None),
                Field::Version(n) => ("version", Some(n)),
                Field::State(n) => ("state", Some(n)),
                Field::Health(n) => ("health", Some(n)),
            };
            let op = if t.equal { "=" } else { "!=" };
            match name {
                Some(n) => write!(f, "modules.{n}.{field} {op} {:?}", t.value)?,
                None => write!(f, "{field} {op} {:?}", t.value)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Artifact, Outcome};
    use crate::node::{HealthRecord, ModuleRecord};

    fn node(version: &str, process: &str, failures: u64) -> NodeStatus {
        let mut status = NodeStatus::default();
        status.inventory.hello(
            &[ModuleRecord {
                name: "app".into(),
                version: "1.0.0".into(),
                sha256: "aa".into(),
                state: 0,
                slot: "current".into(),
            }],
            1,
        );
        let to = Artifact {
            version: version.into(),
            sha256: "bb".into(),
        };
        status
            .inventory
            .answered("app", to, Outcome::Installed { rollback: false }, 2);
        let h = HealthRecord {
            at_ms: 1_000,
            process_state: process.into(),
            probe_successes: 3,
            probe_failures: failures,
            version: version.into(),
            ..Default::default()
        };
        status.inventory.reported("app", version, process, 1_000);
        status.modules.entry("app".into()).or_default().health = Some(h);
        status
    }

    fn matches(filter: &str, status: &NodeStatus, connected: bool) -> bool {
        let f = NodeFilter::parse(filter).expect("parses");
        f.matches(&Subject {
            connected,
            status,
            now_ms: 1_500,
        })
    }

    #[test]
    fn fields_operators_and_wildcards() {
        let old = node("1.2.0", "running", 0);
        let failing = node("1.3.0", "running", 3);
        assert!(matches("", &old, false));
        assert!(matches("modules.app.version = 1.2.0", &old, true));
        assert!(!matches("modules.app.version = 1.2.0", &failing, true));
        assert!(matches("modules.app.version != \"1.2.0\"", &failing, true));
        assert!(
            !matches("modules.other.version != 1.2.0", &old, true),
            "no such module"
        );
        assert!(matches("modules.*.health = degraded", &failing, true));
        assert!(matches("modules.app.health = healthy", &old, true));
        assert!(
            matches("modules.app.health = unknown", &old, false),
            "disconnected"
        );
        assert!(matches(
            "connected = true AND modules.app.state = running",
            &old,
            true
        ));
        assert!(!matches(
            "connected = false AND modules.app.state = running",
            &old,
            true
        ));
    }

    #[test]
    fn bad_filters_name_the_field() {
        for bad in [
            "connected",
            "connected = maybe",
            "labels.region = eu",
            "modules.app.colour = red",
            "modules..version = 1",
            "modules.app.state = dancing",
            "modules.app.health = great",
            "modules.app.version = ",
            "modules.app.version = 1.0 AND",
        ] {
            match NodeFilter::parse(bad) {
                Err(ControlPlaneError::BadField { field, .. }) => assert_eq!(field, "filter"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        assert!(NodeFilter::parse(&"x".repeat(MAX_LEN + 1)).is_err());
    }

    #[test]
    fn the_canonical_form_parses_to_the_same_filter() {
        let f =
            NodeFilter::parse("connected=true AND modules.*.health != failing").expect("parses");
        assert_eq!(NodeFilter::parse(&f.to_string()).ok(), Some(f));
    }
}
