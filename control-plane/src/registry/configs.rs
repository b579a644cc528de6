//! The registry's runtime config layers: set, delete, list, per-node views, and the
//! nodes' answers. Same discipline as weights: compute → persist → publish.

use std::sync::Arc;
use std::time::Instant;

use aviary_certs::Identity;
use aviary_proto::overlay::RunOverlay;

use super::Registry;
use crate::audit::{now_ms, NewEvent};
use crate::error::ControlPlaneError;
use crate::layers::{desired_configs, layer_key, sort, ConfigLayer, Encoded, Scope};
use crate::requests::{Answered, RequestNote};
use crate::store::Change;

/// What a set or delete did.
#[derive(Debug)]
pub(crate) struct LayerChange {
    /// Nodes the layer covers now.
    pub node_ids: Vec<String>,
    /// The layer's version after the change.
    pub version: u32,
    /// Audit sequence number.
    pub event_seq: u64,
}

impl Registry {
    /// Sets (`Some`) or deletes (`None`) the layer `scope` of `module`'s config.
    pub(crate) async fn change_config(
        &self,
        actor: &Identity,
        module: &str,
        scope: Scope,
        overlay: Option<RunOverlay>,
        request: Option<RequestNote>,
    ) -> Result<LayerChange, ControlPlaneError> {
        aviary_proto::manifest::validate_module_name(module)
            .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
        let _writer = self.writer.lock().await;
        let started = Instant::now();
        let key = layer_key(module, &scope);
        let (layer, layers, changed, covered) = {
            let st = self.state();
            let existing = st.configs.iter().find(|l| l.key() == key);
            if overlay.is_none() && existing.is_none_or(|l| l.overlay.is_none()) {
                return Err(ControlPlaneError::NotFound(format!(
                    "config layer {scope} of module {module}"
                )));
            }
            let layer = ConfigLayer {
                seq: st.revision + 1,
                module: module.to_owned(),
                scope: scope.clone(),
                overlay,
                version: existing.map_or(0, |l| l.version) + 1,
            };
            let mut layers = st.configs.clone();
            layers.retain(|l| l.key() != key);
            layers.push(layer.clone());
            sort(&mut layers);
            let mut encoded = Encoded::default();
            let mut changed = Vec::new();
            let mut covered = Vec::new();
            for entry in st.nodes.values().filter(|e| scope.covers(&e.record)) {
                covered.push(entry.record.node_id.clone());
                let next = desired_configs(&layers, &entry.record, &mut encoded);
                if **entry.configs.borrow() != next {
                    changed.push((entry.record.node_id.clone(), next));
                }
            }
            covered.sort();
            (layer, layers, changed, covered)
        };
        let (action, what) = match &layer.overlay {
            Some(o) => (
                "configs.set",
                serde_json::to_string(o).unwrap_or_else(|e| format!("({e})")),
            ),
            None => ("configs.delete", "deleted".to_owned()),
        };
        let detail = format!(
            "{} v{}: {what}; covers {} nodes, revision {}",
            layer.scope,
            layer.version,
            covered.len(),
            layer.seq
        );
        let (revision, version) = (layer.seq, layer.version);
        let request = request.map(|n| {
            let node_ids = covered.clone();
            n.answered(Answered::Config { node_ids, version }, now_ms())
        });
        let stored = self
            .commit(Change {
                configs: vec![layer],
                request,
                revision: Some(revision),
                events: vec![NewEvent::new(
                    actor.to_string(),
                    action,
                    format!("module/{module}"),
                    detail,
                )],
                durable: true,
                ..Default::default()
            })
            .await?;
        let nodes = changed.len();
        {
            let mut st = self.state();
            st.configs = layers;
            st.revision = revision;
            for (node_id, next) in changed {
                if let Some(entry) = st.nodes.get_mut(&node_id) {
                    entry.configs.send_replace(Arc::new(next));
                }
            }
        }
        tracing::info!(
            module,
            %scope,
            revision,
            nodes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "config layer committed and published"
        );
        Ok(LayerChange {
            node_ids: covered,
            version,
            event_seq: stored.first().map_or(0, |e| e.seq),
        })
    }
}
