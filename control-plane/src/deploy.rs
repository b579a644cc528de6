//! Deployments: a rollout without canary steps moves one module to one release on every
//! node a selector matches. Like weights, a node's desired modules are not stored per
//! node: they are a function of the (durable) deployments and the node's labels, so a
//! deployment to 100,000 nodes commits one record.
//!
//! For each module, the newest deployment (by `seq`) whose selector matches the node
//! decides. An aborted deployment sends its nodes back to the previous slot: the version
//! of the newest earlier, not aborted, deployment of that module that matches the node —
//! the edge keeps it in its previous slot, so nothing is downloaded.
//!
//! Invariant: a module revision (`seq` of a deployment, or `abort_seq` once aborted) names
//! exactly one desired version for a node, and only grows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// Where a deployment stands (the `Rollout.state` values that apply without steps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DeployState {
    /// Nodes are being updated.
    Progressing,
    /// Every selected node runs the release.
    Succeeded,
    /// Every selected node answered, and some refused it (their NACKs say why).
    Failed,
    /// Stopped by an operator: nodes go back to their previous slot.
    Aborted,
}

/// One deployment as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Deployment {
    /// `r-SEQ`.
    pub id: String,
    /// Revision at creation (from the global counter).
    pub seq: u64,
    /// Module.
    pub module: String,
    /// Release version.
    pub version: String,
    /// Which nodes.
    pub selector: Selector,
    /// State.
    pub state: DeployState,
    /// Revision of the abort, once aborted.
    pub abort_seq: u64,
    /// Why it stands where it stands.
    pub message: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms.
    pub updated_ms: u64,
}

/// What a node should do about one module.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DesiredModule {
    /// Revision of this desire.
    pub revision: u64,
    /// The release to run.
    pub version: String,
    /// Go back to the previous slot rather than install.
    pub rollback: bool,
    /// The deployment this comes from.
    pub deployment: String,
}

/// module -> desired.
pub(crate) type DesiredModules = BTreeMap<String, DesiredModule>;

/// What `deployments` (sorted by `seq`) want of a node with `labels`.
pub(crate) fn desired_modules(
    deployments: &[Deployment],
    labels: &BTreeMap<String, String>,
) -> DesiredModules {
    let mut out = DesiredModules::new();
    // The newest not-aborted version per module, as we walk forward in time.
    let mut standing: BTreeMap<&str, &Deployment> = BTreeMap::new();
    for d in deployments.iter().filter(|d| d.selector.matches(labels)) {
        match d.state {
            DeployState::Aborted => match standing.get(d.module.as_str()) {
                Some(prev) => {
                    out.insert(
                        d.module.clone(),
                        DesiredModule {
                            revision: d.abort_seq,
                            version: prev.version.clone(),
                            rollback: true,
                            deployment: d.id.clone(),
                        },
                    );
                }
                None => {
                    out.remove(&d.module);
                }
            },
            DeployState::Progressing | DeployState::Succeeded | DeployState::Failed => {
                standing.insert(&d.module, d);
                out.insert(
                    d.module.clone(),
                    DesiredModule {
                        revision: d.seq,
                        version: d.version.clone(),
                        rollback: false,
                        deployment: d.id.clone(),
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(
        seq: u64,
        version: &str,
        selector: &str,
        state: DeployState,
        abort_seq: u64,
    ) -> Deployment {
        Deployment {
            id: format!("r-{seq}"),
            seq,
            module: "gateway".into(),
            version: version.into(),
            selector: Selector::parse(selector).expect("selector"),
            state,
            abort_seq,
            message: String::new(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn the_newest_matching_deployment_wins_and_an_abort_goes_back_one() {
        let eu: BTreeMap<_, _> = [("region".to_string(), "eu".to_string())].into();
        let us: BTreeMap<_, _> = [("region".to_string(), "us".to_string())].into();
        let mut deps = vec![
            dep(3, "1.0.0", "", DeployState::Succeeded, 0),
            dep(7, "2.0.0", "region=eu", DeployState::Progressing, 0),
        ];
        assert_eq!(desired_modules(&deps, &eu)["gateway"].version, "2.0.0");
        assert_eq!(desired_modules(&deps, &us)["gateway"].version, "1.0.0");
        deps[1].state = DeployState::Aborted;
        deps[1].abort_seq = 9;
        let back = &desired_modules(&deps, &eu)["gateway"];
        assert_eq!(
            (back.version.as_str(), back.rollback, back.revision),
            ("1.0.0", true, 9)
        );
        assert_eq!(
            desired_modules(&deps, &us)["gateway"].revision,
            3,
            "us untouched"
        );
        // Aborting the first deployment of a module leaves nothing to go back to.
        let only = vec![dep(3, "1.0.0", "", DeployState::Aborted, 4)];
        assert!(desired_modules(&only, &eu).is_empty());
    }
}
