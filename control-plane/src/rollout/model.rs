//! The rollout record: one module moves to one release on the nodes a selector
//! matches, all at once or in canary steps. Like weights, a node's desired modules are not
//! stored per node: they are a function of the (durable) rollouts, the node's id and
//! its labels, so a rollout to 100,000 nodes commits one record.
//!
//! Canaries: each node has a stable bucket in 0..10000 from a hash of rollout id and node
//! id; at canary scale `p` % the nodes with bucket < 100·p run the new version. The scale
//! only grows, so earlier canaries stay canaries. A rollout without steps is scale 100 from
//! its first revision.
//!
//! For each module the rollouts are walked in `seq` order: a node covered by a live or
//! finished rollout gets its version; an aborted rollout sends the nodes it covered
//! back to the version they ran before it (kept in the edge's previous slot: nothing is
//! downloaded). Nodes a rollout does not cover keep what earlier ones gave them.
//!
//! Invariant: a module revision (the `seq` of the scale change that first covered the
//! node, or `abort_seq`) names exactly one desired version for a node, and only grows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// Where a rollout stands (`Rollout.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RolloutState {
    /// Steps are being carried out.
    Progressing,
    /// Held by an operator (or by a `pause` step without a duration).
    Paused,
    /// Every selected node runs the release.
    Succeeded,
    /// Every selected node answered and some refused it, or a step missed its deadline.
    Failed,
    /// Stopped: covered nodes go back to their previous slot.
    Aborted,
}

impl RolloutState {
    /// Still moving (or held): it owns its module.
    pub(crate) fn is_active(self) -> bool {
        matches!(self, RolloutState::Progressing | RolloutState::Paused)
    }
}

/// One Argo-Rollouts-style canary step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Step {
    /// Share of the selected nodes that run the new version (1..=100).
    CanaryScale(u32),
    /// Wait this long; 0 = until `PromoteRollout`.
    Pause(u32),
    /// The canary nodes' weight for the module (0..=100), until the rollout ends.
    Weight(u32),
    /// Judge the canaries' health over a window (`analysis.rs`).
    Analysis(crate::analysis::AnalysisSpec),
}

/// A change of the canary scale, at a revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ScaleChange {
    /// 0..=100.
    pub percent: u32,
    /// Revision of the change.
    pub seq: u64,
    /// Nodes with a bucket below this are canaries. Chosen when the scale changed so that
    /// ⌈percent × selected ÷ 100⌉ of the nodes selected then are in (20 % of 5 nodes is one
    /// node, not "none by chance"); never lower than the previous cutoff. 0 in old
    /// records: `percent × 100`.
    #[serde(default)]
    pub cutoff: u32,
}

impl ScaleChange {
    fn bound(&self) -> u32 {
        if self.cutoff == 0 {
            self.percent * 100
        } else {
            self.cutoff
        }
    }
}

/// The bucket bound that makes ⌈percent × n ÷ 100⌉ of `buckets` canaries, at least `floor`.
pub(crate) fn cutoff_for(percent: u32, mut buckets: Vec<u32>, floor: u32) -> u32 {
    if percent >= 100 {
        return 10_000;
    }
    buckets.sort_unstable();
    let k = (percent as usize * buckets.len()).div_ceil(100);
    let bound = match k {
        0 => 0,
        k => buckets[k - 1] + 1,
    };
    bound.max(floor).max(1)
}

/// A change of the canary nodes' weight, at a revision (`None`: released to the rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WeightChange {
    /// The weight, or none once the rollout ended.
    pub weight: Option<u32>,
    /// Revision of the change.
    pub seq: u64,
}

/// One rollout as persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rollout {
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
    pub state: RolloutState,
    /// Revision of the abort, once aborted.
    pub abort_seq: u64,
    /// Why it stands where it stands.
    pub message: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms.
    pub updated_ms: u64,
    /// Canary steps; none = everywhere at once.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Index of the step being carried out (`steps.len()` once all are done).
    #[serde(default)]
    pub current_step: u32,
    /// When the current step began (Unix ms), for timed pauses and deadlines.
    #[serde(default)]
    pub step_started_ms: u64,
    /// Scale changes so far, oldest first (empty in records from before canaries: 100 %).
    #[serde(default)]
    pub scale: Vec<ScaleChange>,
    /// A step that waits on nodes longer than this fails the rollout (0 = no deadline).
    #[serde(default)]
    pub progress_deadline_seconds: u32,
    /// Canary weight changes so far, oldest first.
    #[serde(default)]
    pub weight: Vec<WeightChange>,
    /// Failed measurements of the current analysis step.
    #[serde(default)]
    pub analysis_failures: u32,
}

impl Rollout {
    /// A rollout created at revision `seq`, progressing from its first step (with no
    /// steps: everywhere at once, from `seq` on).
    pub(crate) fn new(
        seq: u64,
        module: String,
        version: String,
        selector: Selector,
        steps: Vec<Step>,
        progress_deadline_seconds: u32,
        now_ms: u64,
    ) -> Rollout {
        Rollout {
            id: format!("r-{seq}"),
            seq,
            module,
            version,
            selector,
            state: RolloutState::Progressing,
            abort_seq: 0,
            message: if steps.is_empty() {
                "deploying to every selected node".into()
            } else {
                format!("step 1 of {}", steps.len())
            },
            created_ms: now_ms,
            updated_ms: now_ms,
            scale: if steps.is_empty() {
                vec![ScaleChange {
                    percent: 100,
                    seq,
                    cutoff: 10_000,
                }]
            } else {
                Vec::new()
            },
            steps,
            current_step: 0,
            step_started_ms: now_ms,
            progress_deadline_seconds,
            weight: Vec::new(),
            analysis_failures: 0,
        }
    }

    /// The scale history (records from before canaries have none: 100 % from the start).
    fn scale_changes(&self) -> &[ScaleChange] {
        const ALL: [ScaleChange; 1] = [ScaleChange {
            percent: 100,
            seq: 0,
            cutoff: 10_000,
        }];
        if self.scale.is_empty() && self.steps.is_empty() {
            &ALL
        } else {
            &self.scale
        }
    }

    /// The current canary scale.
    pub(crate) fn percent(&self) -> u32 {
        self.scale_changes().last().map_or(0, |s| s.percent)
    }

    /// The revision at which `node_id` joined the canaries, if it has.
    pub(crate) fn covers(&self, node_id: &str) -> Option<u64> {
        let changes = self.scale_changes();
        let first = changes.first()?;
        // Everyone from the first change (no steps): no hash needed.
        let bucket = if first.bound() >= 10_000 {
            0
        } else {
            canary_bucket(&self.id, node_id)
        };
        changes
            .iter()
            .find(|s| bucket < s.bound())
            .map(|s| if s.seq == 0 { self.seq } else { s.seq })
    }

    /// What this rollout does to node `node_id`'s weights: the revision it contributes and
    /// the weight it imposes on its module, if any.
    pub(crate) fn weight_for(&self, node_id: &str) -> Option<(u64, Option<u32>)> {
        let last = self.weight.last()?;
        if self.state == RolloutState::Aborted {
            // Back to the stable weights, at the abort's revision, for nodes it covered.
            return self
                .covers(node_id)
                .map(|_| (self.abort_seq.max(last.seq), None));
        }
        let covered_at = self.covers(node_id)?;
        match last.weight {
            Some(w) => Some((last.seq.max(covered_at), Some(w))),
            None => Some((last.seq, None)),
        }
    }
}

/// Rollout `r-7` of gateway 1.1.0 to every node with `steps`, created at 1 s, with a 60 s
/// progress deadline (the transition and engine tests' subject).
#[cfg(test)]
pub(crate) fn sample(steps: Vec<Step>) -> Rollout {
    Rollout::new(
        7,
        "gateway".into(),
        "1.1.0".into(),
        Selector::default(),
        steps,
        60,
        1_000,
    )
}

/// A node's stable place in 0..10000 for rollout `id`.
pub(crate) fn canary_bucket(rollout_id: &str, node_id: &str) -> u32 {
    let d = aviary_proto::digest::Sha256::of(format!("{rollout_id}\0{node_id}").as_bytes());
    let n = u64::from_be_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ]);
    (n % 10_000) as u32
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
    /// The rollout this comes from.
    pub rollout: String,
}

/// module -> desired.
pub(crate) type DesiredModules = BTreeMap<String, DesiredModule>;

/// What `rollouts` (sorted by `seq`) want of node `node_id` with `labels`.
pub(crate) fn desired_modules(
    rollouts: &[Rollout],
    node_id: &str,
    labels: &BTreeMap<String, String>,
) -> DesiredModules {
    let mut out = DesiredModules::new();
    // The rollout an abort goes back to, per module, as we walk forward in time: the
    // newest one not judged bad (a failed release is what a node went back from).
    let mut standing: BTreeMap<&str, &Rollout> = BTreeMap::new();
    for d in rollouts.iter().filter(|d| d.selector.matches(labels)) {
        let Some(covered_at) = d.covers(node_id) else {
            continue; // not (yet) a canary: keeps what earlier rollouts gave it
        };
        match d.state {
            RolloutState::Aborted => match standing.get(d.module.as_str()) {
                Some(prev) => {
                    out.insert(
                        d.module.clone(),
                        DesiredModule {
                            revision: d.abort_seq,
                            version: prev.version.clone(),
                            rollback: true,
                            rollout: d.id.clone(),
                        },
                    );
                }
                None => {
                    out.remove(&d.module);
                }
            },
            state => {
                if state != RolloutState::Failed {
                    standing.insert(&d.module, d);
                }
                out.insert(
                    d.module.clone(),
                    DesiredModule {
                        revision: covered_at,
                        version: d.version.clone(),
                        rollback: false,
                        rollout: d.id.clone(),
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
        state: RolloutState,
        abort_seq: u64,
    ) -> Rollout {
        Rollout {
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
            steps: Vec::new(),
            current_step: 0,
            step_started_ms: 0,
            scale: Vec::new(),
            progress_deadline_seconds: 0,
            weight: Vec::new(),
            analysis_failures: 0,
        }
    }

    #[test]
    fn the_newest_matching_deployment_wins_and_an_abort_goes_back_one() {
        let eu: BTreeMap<_, _> = [("region".to_string(), "eu".to_string())].into();
        let us: BTreeMap<_, _> = [("region".to_string(), "us".to_string())].into();
        let mut deps = vec![
            dep(3, "1.0.0", "", RolloutState::Succeeded, 0),
            dep(7, "2.0.0", "region=eu", RolloutState::Progressing, 0),
        ];
        assert_eq!(
            desired_modules(&deps, "gw-1", &eu)["gateway"].version,
            "2.0.0"
        );
        assert_eq!(
            desired_modules(&deps, "gw-1", &us)["gateway"].version,
            "1.0.0"
        );
        deps[1].state = RolloutState::Aborted;
        deps[1].abort_seq = 9;
        let back = &desired_modules(&deps, "gw-1", &eu)["gateway"];
        assert_eq!(
            (back.version.as_str(), back.rollback, back.revision),
            ("1.0.0", true, 9)
        );
        assert_eq!(
            desired_modules(&deps, "gw-1", &us)["gateway"].revision,
            3,
            "us untouched"
        );
        // A failed release is not where an abort goes back to.
        let failed = vec![
            dep(3, "1.0.0", "", RolloutState::Succeeded, 0),
            dep(5, "1.5.0", "", RolloutState::Failed, 0),
            dep(7, "2.0.0", "", RolloutState::Aborted, 9),
        ];
        assert_eq!(
            desired_modules(&failed, "gw-1", &eu)["gateway"].version,
            "1.0.0"
        );
        // Aborting the first rollout of a module leaves nothing to go back to.
        let only = vec![dep(3, "1.0.0", "", RolloutState::Aborted, 4)];
        assert!(desired_modules(&only, "gw-1", &eu).is_empty());
    }
}

#[cfg(test)]
mod canary_tests {
    use super::*;

    #[test]
    fn a_cutoff_makes_the_share_exact_even_in_tiny_fleets() {
        let buckets: Vec<u32> = (0..5)
            .map(|i| canary_bucket("r-1", &format!("gw-{i}")))
            .collect();
        for (percent, want) in [(20, 1), (40, 2), (50, 3), (100, 5)] {
            let cut = cutoff_for(percent, buckets.clone(), 0);
            assert_eq!(
                buckets.iter().filter(|b| **b < cut).count(),
                want,
                "{percent}%"
            );
        }
        // Never below an earlier cutoff: earlier canaries stay canaries.
        assert_eq!(cutoff_for(20, buckets.clone(), 9_999), 9_999);
    }

    #[test]
    fn canaries_are_stable_grow_with_the_scale_and_abort_only_touches_them() {
        let mut d = Rollout {
            id: "r-10".into(),
            seq: 10,
            module: "gateway".into(),
            version: "2.0.0".into(),
            selector: Selector::parse("").expect("selector"),
            state: RolloutState::Progressing,
            abort_seq: 0,
            message: String::new(),
            created_ms: 0,
            updated_ms: 0,
            steps: vec![Step::CanaryScale(20), Step::CanaryScale(50)],
            current_step: 0,
            step_started_ms: 0,
            scale: vec![ScaleChange {
                percent: 20,
                seq: 11,
                cutoff: 0,
            }],
            progress_deadline_seconds: 0,
            weight: Vec::new(),
            analysis_failures: 0,
        };
        let nodes: Vec<String> = (0..1000).map(|i| format!("gw-{i}")).collect();
        let at20: Vec<&String> = nodes.iter().filter(|n| d.covers(n).is_some()).collect();
        assert!(
            (150..250).contains(&at20.len()),
            "{} canaries at 20 %",
            at20.len()
        );
        d.scale.push(ScaleChange {
            percent: 50,
            seq: 12,
            cutoff: 0,
        });
        let at50: Vec<&String> = nodes.iter().filter(|n| d.covers(n).is_some()).collect();
        assert!(
            (420..580).contains(&at50.len()),
            "{} canaries at 50 %",
            at50.len()
        );
        // Earlier canaries stay canaries, with the revision that first covered them.
        for n in &at20 {
            assert_eq!(d.covers(n), Some(11));
        }
        let labels = BTreeMap::new();
        let stable = Rollout {
            id: "r-3".into(),
            seq: 3,
            version: "1.0.0".into(),
            steps: Vec::new(),
            scale: Vec::new(),
            state: RolloutState::Succeeded,
            ..d.clone()
        };
        let deps = vec![stable.clone(), d.clone()];
        let outsider = nodes
            .iter()
            .find(|n| d.covers(n).is_none())
            .expect("a non-canary");
        assert_eq!(
            desired_modules(&deps, outsider, &labels)["gateway"].version,
            "1.0.0"
        );
        assert_eq!(
            desired_modules(&deps, at20[0], &labels)["gateway"].version,
            "2.0.0"
        );
        // Abort: canaries roll back, the others never moved.
        let aborted = Rollout {
            state: RolloutState::Aborted,
            abort_seq: 13,
            ..d
        };
        let deps = vec![stable, aborted];
        let back = &desired_modules(&deps, at20[0], &labels)["gateway"];
        assert_eq!(
            (back.version.as_str(), back.rollback, back.revision),
            ("1.0.0", true, 13)
        );
        let same = &desired_modules(&deps, outsider, &labels)["gateway"];
        assert_eq!(
            (same.version.as_str(), same.rollback, same.revision),
            ("1.0.0", false, 3)
        );
    }
}
