//! Rollouts: one module moves to one release on the nodes a selector matches, all at
//! once or in canary steps.
//!
//! * `model.rs`: the record (`Rollout`), its steps and canary scale, and what each node
//!   desires because of it.
//! * `transition.rs`: every change of state, as methods that edit the record and say
//!   what they did; nothing else assigns `Rollout::state`.
//! * `engine.rs`: the tick that carries out the steps of progressing rollouts.
//!
//! The registry commits a transition (`Registry::update_rollout`); the admin API and the
//! engine only choose which one.

mod engine;
mod model;
mod transition;

pub(crate) use engine::run;
pub(crate) use model::{
    canary_bucket, cutoff_for, desired_modules, DesiredModule, DesiredModules, Rollout,
    RolloutState, Step,
};
pub(crate) use transition::{Refused, Transition};

#[cfg(test)]
pub(crate) use model::sample;

/// Node counts of a rollout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RolloutProgress {
    /// Nodes the selector matches.
    pub selected: u32,
    /// Of those, the nodes the canary scale covers so far.
    pub canaries: u32,
    /// Canaries with a live stream (a step waits only for these; the others catch up).
    pub connected_canaries: u32,
    /// Nodes that acknowledged this rollout's revision.
    pub installed: u32,
    /// Of those, the nodes whose latest health report shows the version running with
    /// every probe passing.
    pub healthy: u32,
    /// Nodes that refused it.
    pub failed: u32,
    /// Nodes with no artifact for their architecture.
    pub skipped: u32,
}
