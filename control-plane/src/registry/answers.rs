//! What nodes tell the control plane back: ACKs, NACKs, transfer progress and health,
//! kept in memory and written in batches (`flush_statuses`).

use aviary_proto::resource::Resource;

use super::Registry;
use crate::audit::now_ms;
use crate::error::ControlPlaneError;
use crate::health::Health;
use crate::inventory::{Artifact, Outcome};
use crate::journal::blocking;
use crate::node::{HealthRecord, NackRecord, NodeStatus, TransferProgress};

/// What a node said about a revision it was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Applied.
    Ack,
    /// Refused, with the node's reason.
    Nack(String),
}

impl Registry {
    /// Records a node's answer to `revision` of `resource`. A NACK is kept, and parked
    /// by every later stream, until the desired state of the resource moves on; any
    /// answer about a module ends its transfer. (A rollout's completion is the engine's
    /// tick: counting the fleet on every ACK would make a fleet-wide rollout quadratic.)
    pub(crate) fn record_answer(
        &self,
        node_id: &str,
        resource: &Resource,
        revision: u64,
        answer: &Answer,
    ) {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return;
        };
        let nack = |error: &str| {
            Some(NackRecord {
                revision,
                error: error.to_owned(),
            })
        };
        let status = &mut entry.status;
        match (resource, answer) {
            (Resource::Weights, Answer::Ack) => {
                status.acked_revision = status.acked_revision.max(revision);
            }
            (Resource::Weights, Answer::Nack(error)) => status.nacked = nack(error),
            (Resource::Module(m), answer) => {
                let p = status.modules.entry(m.clone()).or_default();
                match answer {
                    Answer::Ack => p.acked_revision = p.acked_revision.max(revision),
                    Answer::Nack(error) => p.nacked = nack(error),
                }
                p.transfer = None;
            }
            (Resource::Config(m), answer) => {
                let p = status.configs.entry(m.clone()).or_default();
                match answer {
                    Answer::Ack => p.acked_revision = p.acked_revision.max(revision),
                    Answer::Nack(error) => p.nacked = nack(error),
                }
            }
        }
        st.dirty.insert(node_id.to_owned());
    }

    /// Writes statuses changed since the last call (ACKs, NACKs, last seen) in one batch;
    /// with `health`, also those whose only change is a health report.
    pub(crate) async fn flush_statuses(&self, health: bool) -> Result<(), ControlPlaneError> {
        let rows: Vec<(String, NodeStatus)> = {
            let mut st = self.state();
            let mut dirty = std::mem::take(&mut st.dirty);
            if health {
                dirty.extend(std::mem::take(&mut st.health_dirty));
            }
            dirty
                .into_iter()
                .filter_map(|id| {
                    let status = st.nodes.get(&id)?.status.clone();
                    Some((id, status))
                })
                .collect()
        };
        if rows.is_empty() {
            return Ok(());
        }
        let store = self.journal.store().clone();
        let ids: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
        let saved = blocking(move || store.save_statuses(&rows)).await?;
        if let Err(e) = saved {
            // Not written: try again at the next flush.
            self.state().dirty.extend(ids);
            return Err(e.into());
        }
        metrics::counter!("aviary_store_status_writes_total").increment(ids.len() as u64);
        Ok(())
    }

    /// Records how far a node's module transfer has come (shown by `GetNode`).
    pub(crate) fn record_transfer(
        &self,
        node_id: &str,
        module: &str,
        transfer: Option<TransferProgress>,
    ) {
        let mut st = self.state();
        if let Some(entry) = st.nodes.get_mut(node_id) {
            entry
                .status
                .modules
                .entry(module.to_owned())
                .or_default()
                .transfer = transfer;
            st.dirty.insert(node_id.to_owned());
        }
    }

    /// Records what `node_id` did with the update that led `module` to `to`: its
    /// inventory shows it at once.
    pub(crate) fn record_installed(
        &self,
        node_id: &str,
        module: &str,
        to: Artifact,
        outcome: Outcome,
    ) {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return;
        };
        if entry
            .status
            .inventory
            .answered(module, to, outcome, now_ms())
        {
            st.dirty.insert(node_id.to_owned());
        }
    }

    /// Records health reports of the modules `node_id` runs or is meant to run; reports
    /// about any other module are dropped (a node must not grow its own record without
    /// bound). Returns how many were dropped.
    ///
    /// A report is also the node's heartbeat. Neither is written by itself: the status
    /// is written at once when the report changes what the node runs, at the slower
    /// health cadence when it changes a module's health word, and otherwise with the
    /// next change (a steady fleet of 19,000 costs the store nothing).
    pub(crate) fn record_health(
        &self,
        node_id: &str,
        reports: Vec<(String, HealthRecord)>,
    ) -> usize {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return reports.len();
        };
        let now = now_ms();
        entry.status.last_heartbeat_ms = now;
        let mut ignored = 0;
        let (mut ran, mut word) = (false, false);
        for (module, health) in reports {
            let known = entry.record.modules.iter().any(|m| m.name == module)
                || entry.modules.borrow().contains_key(&module);
            if !known {
                ignored += 1;
                continue;
            }
            entry
                .history
                .entry(module.clone())
                .or_default()
                .push(&health);
            ran |= entry.status.inventory.reported(
                &module,
                &health.version,
                &health.process_state,
                now,
            );
            let slot = &mut entry.status.modules.entry(module).or_default().health;
            word |= slot.as_ref().map(Health::judge) != Some(Health::judge(&health));
            *slot = Some(health);
        }
        if ran {
            st.dirty.insert(node_id.to_owned());
        } else if word {
            st.health_dirty.insert(node_id.to_owned());
        }
        ignored
    }
}
