//! Domain snapshots of the registry for readers: a node, its weights, one merged config.
//! `api/views.rs` turns them into proto messages; nothing here knows the wire.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Entry, Registry};
use crate::audit::now_ms;
use crate::error::ControlPlaneError;
use crate::filter::{NodeFilter, Subject};
use crate::layers::{ConfigLayer, DesiredConfig, DesiredConfigs};
use crate::node::{ConfigProgress, DesiredWeights, NodeRecord, NodeStatus};
use crate::rollout::DesiredModules;
use crate::selector::Selector;

/// One node as readers see it: its record, answers, desired state and whether it is
/// connected now.
#[derive(Clone, Debug)]
pub(crate) struct NodeView {
    /// The persisted record.
    pub record: NodeRecord,
    /// Its answers (ACKs, NACKs, transfers, health).
    pub status: NodeStatus,
    /// Its desired weights.
    pub weights: DesiredWeights,
    /// A live stream is attached.
    pub connected: bool,
    /// Its desired modules.
    pub modules: Arc<DesiredModules>,
    /// Its merged runtime configs.
    pub configs: Arc<DesiredConfigs>,
}

/// A node's weights now, as `WatchWeights` streams them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NodeWeights {
    /// The node.
    pub node_id: String,
    /// Revision of its weight map.
    pub revision: u64,
    /// module -> weight.
    pub weights: BTreeMap<String, u32>,
    /// A live stream is attached.
    pub connected: bool,
}

/// One node's merged config of one module, with the node's answers about it.
#[derive(Clone, Debug)]
pub(crate) struct NodeConfigView {
    /// The node.
    pub node_id: String,
    /// The module.
    pub module: String,
    /// The merge; `None` when no layer covers the node.
    pub config: Option<DesiredConfig>,
    /// What the node answered about it.
    pub answers: Option<ConfigProgress>,
}

impl Registry {
    /// At most `limit` nodes matching `selector` and `filter` with ids after `after`,
    /// sorted by id (a page of `ListNodes`: only those are copied).
    pub(crate) fn list_after(
        &self,
        selector: &Selector,
        filter: &NodeFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<NodeView> {
        let st = self.state();
        let now_ms = now_ms();
        let mut ids: Vec<&String> = st
            .nodes
            .iter()
            .filter(|(id, e)| {
                after.is_none_or(|a| id.as_str() > a)
                    && selector.matches(&e.record.labels)
                    && filter.matches(&Subject {
                        connected: e.session.is_some(),
                        status: &e.status,
                        now_ms,
                    })
            })
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids.into_iter()
            .take(limit)
            .filter_map(|id| st.nodes.get(id).map(node_view))
            .collect()
    }

    /// One node.
    pub(crate) fn get(&self, node_id: &str) -> Result<NodeView, ControlPlaneError> {
        self.state()
            .nodes
            .get(node_id)
            .map(node_view)
            .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))
    }

    /// `module`'s merged config on `node_id`, with the source of each value.
    pub(crate) fn node_config(
        &self,
        module: &str,
        node_id: &str,
    ) -> Result<NodeConfigView, ControlPlaneError> {
        let st = self.state();
        let entry = st
            .nodes
            .get(node_id)
            .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))?;
        let configs = entry.configs.borrow().clone();
        Ok(config_view(entry, module, configs.get(module)))
    }

    /// The live layers of `module` (every module when `None`), in merge order.
    pub(crate) fn config_layers(&self, module: Option<&str>) -> Vec<ConfigLayer> {
        self.state()
            .configs
            .iter()
            .filter(|l| l.overlay.is_some() && module.is_none_or(|m| l.module == m))
            .cloned()
            .collect()
    }
}

/// The weights `entry` has now.
pub(super) fn weights_of(entry: &Entry) -> NodeWeights {
    NodeWeights {
        node_id: entry.record.node_id.clone(),
        revision: entry.current.revision,
        weights: entry.current.weights.clone(),
        connected: entry.session.is_some(),
    }
}

fn node_view(entry: &Entry) -> NodeView {
    NodeView {
        record: entry.record.clone(),
        status: entry.status.clone(),
        weights: entry.current.clone(),
        connected: entry.session.is_some(),
        modules: entry.modules.borrow().clone(),
        configs: entry.configs.borrow().clone(),
    }
}

fn config_view(entry: &Entry, module: &str, config: Option<&DesiredConfig>) -> NodeConfigView {
    NodeConfigView {
        node_id: entry.record.node_id.clone(),
        module: module.to_owned(),
        config: config.cloned(),
        answers: entry.status.configs.get(module).cloned(),
    }
}
