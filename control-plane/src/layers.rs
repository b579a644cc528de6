//! Runtime config layers of modules, and how they merge into one node's config.
//!
//! A module's layers are its base (every node), overlays (nodes a label selector
//! matches, applied in the order they were last set) and node layers. The merge for a
//! node is not stored, like its weights: it is a function of the durable layers and the
//! node's labels. Its revision is the highest `seq` among the module's layers that cover
//! the node, or the node's `label_revision` if higher; deleting a layer leaves a
//! tombstone with a new seq so that revisions still only grow.
//!
//! Invariant: for one node and module, a revision number names exactly one merged
//! config, across restarts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use aviary_proto::overlay::{RunOverlay, Sources};
use bytes::Bytes;

use crate::error::ControlPlaneError;
use crate::node::NodeRecord;
use crate::selector::Selector;

/// Which nodes a layer covers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Scope {
    /// Every node that runs the module.
    Base,
    /// The nodes a (non-empty) selector matches.
    Selector(Selector),
    /// One node.
    Node(String),
}

impl Scope {
    /// From a request's selector and node id (neither set = the base).
    pub(crate) fn parse(selector: &str, node_id: &str) -> Result<Scope, ControlPlaneError> {
        match (selector.trim().is_empty(), node_id.is_empty()) {
            (true, true) => Ok(Scope::Base),
            (false, true) => {
                let selector = Selector::parse(selector)?;
                if selector == Selector::default() {
                    return Ok(Scope::Base);
                }
                Ok(Scope::Selector(selector))
            }
            (true, false) => {
                aviary_certs::validate_name("node id", node_id)
                    .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
                Ok(Scope::Node(node_id.to_owned()))
            }
            (false, false) => Err(ControlPlaneError::InvalidArgument(
                "a config layer has a selector or a node id, not both".into(),
            )),
        }
    }

    /// Whether the layer applies to `node`.
    pub(crate) fn covers(&self, node: &NodeRecord) -> bool {
        match self {
            Scope::Base => true,
            Scope::Selector(s) => s.matches(&node.labels),
            Scope::Node(id) => *id == node.node_id,
        }
    }

    /// Merge order: base, overlays, node.
    pub(crate) fn rank(&self) -> u8 {
        match self {
            Scope::Base => 0,
            Scope::Selector(_) => 1,
            Scope::Node(_) => 2,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Base => f.write_str("base"),
            Scope::Selector(s) => write!(f, "selector {s}"),
            Scope::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// One layer of one module's config, as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ConfigLayer {
    /// Revision counter value of its last change.
    pub seq: u64,
    /// Module name.
    pub module: String,
    /// Which nodes.
    pub scope: Scope,
    /// What it overrides; `None` once deleted (a tombstone keeps revisions growing).
    pub overlay: Option<RunOverlay>,
    /// Bumped by every set of this layer.
    pub version: u32,
}

impl ConfigLayer {
    /// Layers with the same key replace each other.
    pub(crate) fn key(&self) -> String {
        layer_key(&self.module, &self.scope)
    }

    /// "selector region=eu (v2)": what provenance shows.
    pub(crate) fn name(&self) -> String {
        format!("{} (v{})", self.scope, self.version)
    }
}

/// The store key of a module's layer.
pub(crate) fn layer_key(module: &str, scope: &Scope) -> String {
    format!("{module}\u{0}{scope}")
}

/// One module's merged config for one node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DesiredConfig {
    /// Revision of this merge for this node.
    pub revision: u64,
    /// The merge of the layers that cover the node.
    pub overlay: RunOverlay,
    /// The layer each value came from.
    pub sources: Sources,
    /// Names of the live layers covering the node, lowest first.
    pub layers: Vec<String>,
    /// `ControlMessage{config}` without a nonce, encoded once and shared.
    pub message: Bytes,
}

/// module -> merged config, for every module that has layers.
pub(crate) type DesiredConfigs = BTreeMap<String, DesiredConfig>;

/// Sorts layers into merge order: base, overlays by `seq`, node layers.
pub(crate) fn sort(layers: &mut [ConfigLayer]) {
    layers.sort_by_key(|l| (l.module.clone(), l.scope.rank(), l.seq));
}

/// Shares the encoded messages of equal merges between nodes.
#[derive(Default)]
pub(crate) struct Encoded(HashMap<(String, u64, Vec<String>), Bytes>);

/// The configs `layers` (in merge order) give `node`. Modules none of whose layers ever
/// covered the node at a revision above 0 are left out (nothing to send).
pub(crate) fn desired_configs(
    layers: &[ConfigLayer],
    node: &NodeRecord,
    encoded: &mut Encoded,
) -> DesiredConfigs {
    let mut out = DesiredConfigs::new();
    let mut i = 0;
    while i < layers.len() {
        let module = &layers[i].module;
        let end = i + layers[i..]
            .iter()
            .take_while(|l| l.module == *module)
            .count();
        let covering: Vec<&ConfigLayer> = layers[i..end]
            .iter()
            .filter(|l| l.scope.covers(node))
            .collect();
        let newest = covering.iter().map(|l| l.seq).max().unwrap_or(0);
        // A label change may have moved the node out of an overlay: the new label
        // revision makes it take the (smaller) merge.
        let revision = newest.max(node.label_revision);
        if revision > 0 {
            let live: Vec<(String, &RunOverlay)> = covering
                .iter()
                .filter_map(|l| Some((l.name(), l.overlay.as_ref()?)))
                .collect();
            let (overlay, sources) = RunOverlay::merge(live.iter().map(|(n, o)| (n.as_str(), *o)));
            let names: Vec<String> = live.iter().map(|(n, _)| n.clone()).collect();
            let message = encoded
                .0
                .entry((module.clone(), revision, names.clone()))
                .or_insert_with(|| crate::wire::config_message(module, revision, &overlay))
                .clone();
            out.insert(
                module.clone(),
                DesiredConfig {
                    revision,
                    overlay,
                    sources,
                    layers: names,
                    message,
                },
            );
        }
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(seq: u64, scope: Scope, toml: Option<&str>) -> ConfigLayer {
        ConfigLayer {
            seq,
            module: "gateway".into(),
            scope,
            overlay: toml.map(|t| RunOverlay::from_toml(t).expect("overlay")),
            version: 1,
        }
    }

    fn node(id: &str, region: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            labels: [("region".to_string(), region.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn layers_merge_base_then_overlays_then_node() {
        let eu = Scope::Selector(Selector::parse("region=eu").expect("selector"));
        let mut layers = vec![
            layer(
                7,
                Scope::Node("a".into()),
                Some("env = { LEVEL = \"node\" }"),
            ),
            layer(3, eu, Some("env = { LEVEL = \"eu\", ZONE = \"eu\" }")),
            layer(
                5,
                Scope::Base,
                Some("env = { LEVEL = \"base\" }\nargs = [\"-q\"]"),
            ),
        ];
        sort(&mut layers);
        let mut enc = Encoded::default();
        let a = &desired_configs(&layers, &node("a", "eu"), &mut enc)["gateway"];
        assert_eq!(a.revision, 7);
        assert_eq!(a.overlay.env["LEVEL"], "node");
        assert_eq!(a.sources["env.LEVEL"], "node a (v1)");
        assert_eq!(a.sources["env.ZONE"], "selector region=eu (v1)");
        assert_eq!(a.sources["args"], "base (v1)");
        let b = &desired_configs(&layers, &node("b", "eu"), &mut enc)["gateway"];
        assert_eq!((b.revision, b.overlay.env["LEVEL"].as_str()), (5, "eu"));
        let c = &desired_configs(&layers, &node("c", "us"), &mut enc)["gateway"];
        assert_eq!((c.revision, c.overlay.env["LEVEL"].as_str()), (5, "base"));
        assert!(!c.overlay.env.contains_key("ZONE"));
    }

    #[test]
    fn a_deleted_layer_still_moves_the_revision_of_the_nodes_it_covered() {
        let eu = Scope::Selector(Selector::parse("region=eu").expect("selector"));
        let layers = vec![layer(9, eu, None)];
        let mut enc = Encoded::default();
        let eu_node = desired_configs(&layers, &node("a", "eu"), &mut enc);
        assert_eq!(eu_node["gateway"].revision, 9);
        assert!(eu_node["gateway"].overlay.is_empty());
        assert!(desired_configs(&layers, &node("b", "us"), &mut enc).is_empty());
    }
}
