//! Every change of a rollout's state, in one place. Each transition edits the record in
//! memory and says what it did (`Transition`); none writes anything. The caller commits
//! the edited record with the transition's audit action in one journal commit
//! (`Registry::update_rollout`), and only then does any node hear of it — the shape of
//! Bottlerocket's signpost: state methods that do not write, and one explicit commit.
//!
//! ```text
//!              ┌──────── promote / resume ────────┐
//!              ▼                                   │
//!   Progressing ── pause step (0 s) / pause ────────► Paused
//!        │  ├─ scale p: canary scale → p, wait until every connected canary answered
//!        │  ├─ set_weight w: the canaries' module weight is w until the rollout ends
//!        │  ├─ advance: a timed pause or a scale step is done
//!        │  ├─ analysis_passed / analysis_failed (failure_limit reached → Aborted)
//!        │  └─ inconclusive: too little data by the deadline → Paused
//!        ├──► finish → Succeeded (every node installed or skipped) or Failed (refusals)
//!        ├──► fail → Failed (a step missed its progress deadline)
//!        └──► abort → Aborted (operator, failed canaries): canaries go back
//! ```

use super::model::{Rollout, RolloutState, ScaleChange, Step, WeightChange};
use super::RolloutProgress;

/// What a transition did, for the commit that records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    /// The audit action (`rollout.step`, `rollout.paused`, ...).
    pub action: &'static str,
    /// The `to` label of `aviary_rollout_transitions_total`, when it counts there.
    pub counted_as: Option<&'static str>,
    /// It takes the revision it was given (scale, weight or abort changed what nodes
    /// desire), so the nodes it selects must be recomputed.
    pub takes_revision: bool,
}

impl Transition {
    const fn new(action: &'static str, counted_as: Option<&'static str>, takes: bool) -> Self {
        Transition {
            action,
            counted_as,
            takes_revision: takes,
        }
    }
}

/// A transition refused in the rollout's current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rollout {id} is {state:?}: {reason}")]
pub(crate) struct Refused {
    /// The rollout.
    pub id: String,
    /// Its state.
    pub state: RolloutState,
    /// What only another state allows.
    pub reason: &'static str,
}

impl Rollout {
    fn refuse(&self, reason: &'static str) -> Refused {
        Refused {
            id: self.id.clone(),
            state: self.state,
            reason,
        }
    }

    /// The engine moves the canary scale to `percent` (bucket bound `cutoff`) at `seq`.
    pub(crate) fn scale(&mut self, percent: u32, cutoff: u32, seq: u64) -> Transition {
        self.scale.push(ScaleChange {
            percent,
            seq,
            cutoff,
        });
        let total = self.steps.len();
        self.message = if (self.current_step as usize) < total {
            format!(
                "step {} of {total}: canary scale {percent}%",
                self.current_step + 1
            )
        } else {
            "all steps done: every selected node".into()
        };
        Transition::new("rollout.step", Some("step"), true)
    }

    /// The engine gives the canaries `weight` at `seq`, and goes to the next step.
    pub(crate) fn set_weight(&mut self, weight: u32, seq: u64, now_ms: u64) -> Transition {
        self.weight.push(WeightChange {
            weight: Some(weight),
            seq,
        });
        self.next_step(now_ms);
        self.message = format!(
            "step {} of {} done: canary weight {weight}",
            self.current_step,
            self.steps.len()
        );
        Transition::new("rollout.step", None, true)
    }

    /// The current step is done (`done` says how); on to the next.
    pub(crate) fn advance(&mut self, done: &str, now_ms: u64) -> Transition {
        self.next_step(now_ms);
        self.message = format!(
            "step {} of {} done ({done})",
            self.current_step,
            self.steps.len()
        );
        Transition::new("rollout.step", None, false)
    }

    /// An open-ended pause step: hold until promoted.
    pub(crate) fn hold(&mut self) -> Transition {
        self.state = RolloutState::Paused;
        self.message = format!(
            "paused at step {} of {} until promoted",
            self.current_step + 1,
            self.steps.len()
        );
        Transition::new("rollout.paused", Some("paused"), false)
    }

    /// A step waited on nodes past its deadline.
    pub(crate) fn fail(&mut self, why: String) -> Transition {
        self.state = RolloutState::Failed;
        self.message = why;
        Transition::new("rollout.failed", Some("failed"), false)
    }

    /// Stops the rollout at revision `seq`: the nodes it covered go back to their previous
    /// slot, its canary weight to the rules. `message` is the whole reason shown.
    pub(crate) fn abort(&mut self, message: String, seq: u64) -> Result<Transition, Refused> {
        if !self.state.is_active() {
            return Err(self.refuse("only a rollout in progress can be aborted"));
        }
        self.state = RolloutState::Aborted;
        self.abort_seq = seq;
        self.message = message;
        Ok(Transition::new("rollout.aborted", Some("aborted"), true))
    }

    /// The analysis window passed: on to the next step.
    pub(crate) fn analysis_passed(&mut self, figures: &str, now_ms: u64) -> Transition {
        self.next_step(now_ms);
        self.analysis_failures = 0;
        self.message = format!("analysis passed; {figures}");
        Transition::new("rollout.analysis", Some("analysis_passed"), false)
    }

    /// The analysis window failed: measure again, or abort at `seq` once `limit` windows
    /// failed.
    pub(crate) fn analysis_failed(
        &mut self,
        reasons: &str,
        figures: &str,
        limit: u32,
        seq: u64,
        now_ms: u64,
    ) -> Transition {
        self.analysis_failures += 1;
        let aborted = self.analysis_failures >= limit;
        if aborted {
            self.state = RolloutState::Aborted;
            self.abort_seq = seq;
            self.message = format!(
                "aborted: analysis failed {} time(s): {reasons}; {figures}",
                self.analysis_failures
            );
        } else {
            self.step_started_ms = now_ms;
            self.message = format!(
                "analysis failed ({} of {limit}): {reasons}; {figures}",
                self.analysis_failures
            );
        }
        Transition::new("rollout.analysis", Some("analysis_failed"), aborted)
    }

    /// Too little data to judge by the deadline: hold for an operator.
    pub(crate) fn inconclusive(&mut self, why: &str, figures: &str) -> Transition {
        self.state = RolloutState::Paused;
        self.message = format!("analysis inconclusive: {why}; {figures}");
        Transition::new("rollout.paused", None, false)
    }

    /// An operator holds a progressing rollout.
    pub(crate) fn pause(&mut self, actor: &str) -> Result<Transition, Refused> {
        if self.state != RolloutState::Progressing {
            return Err(self.refuse("only a progressing rollout can be paused"));
        }
        self.state = RolloutState::Paused;
        self.message = format!("paused by {actor} at step {}", self.current_step + 1);
        Ok(Transition::new("rollout.paused", None, false))
    }

    /// An operator resumes a paused rollout (an open-ended pause step counts as done).
    pub(crate) fn resume(&mut self, actor: &str, now_ms: u64) -> Result<Transition, Refused> {
        if self.state != RolloutState::Paused {
            return Err(self.refuse("not paused"));
        }
        if matches!(
            self.steps.get(self.current_step as usize),
            Some(Step::Pause(0))
        ) {
            self.current_step += 1;
        }
        self.state = RolloutState::Progressing;
        self.step_started_ms = now_ms;
        self.message = format!("resumed by {actor} at step {}", self.current_step + 1);
        Ok(Transition::new("rollout.resumed", None, false))
    }

    /// An operator skips the current step, or every step with `full`.
    pub(crate) fn promote(
        &mut self,
        actor: &str,
        full: bool,
        now_ms: u64,
    ) -> Result<Transition, Refused> {
        if !self.state.is_active() {
            return Err(self.refuse("nothing to promote"));
        }
        let total = self.steps.len() as u32;
        self.current_step = if full {
            total
        } else {
            (self.current_step + 1).min(total)
        };
        self.state = RolloutState::Progressing;
        self.step_started_ms = now_ms;
        self.message = if full {
            format!("promoted to the end by {actor}")
        } else {
            format!("promoted by {actor} to step {}", self.current_step + 1)
        };
        Ok(Transition::new("rollout.promoted", None, false))
    }

    /// Every selected node answered: Succeeded, or Failed if some refused. A canary weight
    /// goes back to the rules at `seq`.
    pub(crate) fn finish(&mut self, p: RolloutProgress, seq: u64) -> Transition {
        let (action, to) = if p.failed == 0 {
            self.state = RolloutState::Succeeded;
            self.message = "every selected node installed it (or was skipped)".into();
            ("rollout.succeeded", "succeeded")
        } else {
            self.state = RolloutState::Failed;
            self.message = format!(
                "{} of {} node(s) refused it; `aviary nodes get` shows why",
                p.failed, p.selected
            );
            ("rollout.failed", "failed")
        };
        let release = self.weight.last().is_some_and(|w| w.weight.is_some());
        if release {
            self.weight.push(WeightChange { weight: None, seq });
        }
        Transition::new(action, Some(to), release)
    }

    fn next_step(&mut self, now_ms: u64) {
        self.current_step += 1;
        self.step_started_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::AnalysisSpec;

    use crate::rollout::model::sample as rollout;

    fn steps() -> Vec<Step> {
        vec![
            Step::CanaryScale(20),
            Step::Weight(10),
            Step::Pause(0),
            Step::Analysis(AnalysisSpec {
                window_seconds: 30,
                failure_limit: 2,
                ..Default::default()
            }),
        ]
    }

    #[test]
    fn a_new_rollout_progresses_and_one_without_steps_covers_everyone() {
        let r = rollout(steps());
        assert_eq!(r.state, RolloutState::Progressing);
        assert_eq!(r.message, "step 1 of 4");
        assert_eq!(r.percent(), 0);
        let all = rollout(Vec::new());
        assert_eq!(all.percent(), 100);
        assert_eq!(all.covers("any-node"), Some(7));
    }

    #[test]
    fn engine_steps_move_scale_weight_and_step_and_say_whether_they_take_a_revision() {
        let mut r = rollout(steps());
        let t = r.scale(20, 2_000, 8);
        assert_eq!(t, Transition::new("rollout.step", Some("step"), true));
        assert_eq!((r.percent(), r.current_step), (20, 0));
        let t = r.advance("20% canary: 1 of 1 node(s) installed", 2_000);
        assert!(!t.takes_revision);
        assert_eq!((r.current_step, r.step_started_ms), (1, 2_000));
        let t = r.set_weight(10, 9, 3_000);
        assert!(t.takes_revision && t.counted_as.is_none());
        assert_eq!(
            r.weight.last().map(|w| (w.weight, w.seq)),
            Some((Some(10), 9))
        );
        assert_eq!(r.current_step, 2);
        let t = r.hold();
        assert_eq!(
            (r.state, t.action),
            (RolloutState::Paused, "rollout.paused")
        );
    }

    #[test]
    fn operators_pause_resume_and_promote_only_from_the_states_that_allow_it() {
        let mut r = rollout(steps());
        assert!(
            r.resume("admin/a", 5).is_err(),
            "resumed a progressing rollout"
        );
        r.pause("admin/a")
            .map(drop)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.state, RolloutState::Paused);
        let again = r.pause("admin/a").err().map(|e| e.to_string());
        assert_eq!(
            again.as_deref(),
            Some("rollout r-7 is Paused: only a progressing rollout can be paused")
        );
        r.resume("admin/a", 5)
            .map(drop)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.state, r.step_started_ms), (RolloutState::Progressing, 5));
        // Resuming an open-ended pause step is what it waits for.
        r.current_step = 2;
        r.hold();
        r.resume("admin/a", 6)
            .map(drop)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.current_step, 3);
        r.promote("admin/a", false, 7)
            .map(drop)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.current_step, 4);
        r.promote("admin/a", true, 8)
            .map(drop)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.current_step, 4, "promote never passes the last step");
    }

    #[test]
    fn abort_takes_a_revision_and_is_refused_once_the_rollout_ended() {
        let mut r = rollout(steps());
        let t = r.abort("aborted: by operator".into(), 12);
        assert_eq!(
            t,
            Ok(Transition::new("rollout.aborted", Some("aborted"), true))
        );
        assert_eq!((r.state, r.abort_seq), (RolloutState::Aborted, 12));
        let again = r.abort("aborted: twice".into(), 13);
        assert!(again.is_err());
        assert_eq!(r.abort_seq, 12);
        for end in [RolloutState::Succeeded, RolloutState::Failed] {
            let mut r = rollout(steps());
            r.state = end;
            assert!(r.abort("x".into(), 1).is_err());
            assert!(r.promote("admin/a", false, 1).is_err());
            assert!(r.pause("admin/a").is_err());
        }
    }

    #[test]
    fn analysis_failures_abort_only_at_the_limit_and_a_pass_resets_them() {
        let mut r = rollout(steps());
        r.current_step = 3;
        let t = r.analysis_failed("error rate 0.5", "{}", 2, 20, 100);
        assert!(!t.takes_revision);
        assert_eq!(
            (r.state, r.analysis_failures),
            (RolloutState::Progressing, 1)
        );
        assert_eq!(r.step_started_ms, 100);
        let t = r.analysis_failed("error rate 0.5", "{}", 2, 21, 200);
        assert!(t.takes_revision);
        assert_eq!((r.state, r.abort_seq), (RolloutState::Aborted, 21));
        let mut r = rollout(steps());
        r.current_step = 3;
        r.analysis_failed("x", "{}", 3, 20, 100);
        r.analysis_passed("{}", 300);
        assert_eq!((r.analysis_failures, r.current_step), (0, 4));
        let mut r = rollout(steps());
        r.inconclusive("2 reports of 10", "{}");
        assert_eq!(r.state, RolloutState::Paused);
    }

    #[test]
    fn finish_succeeds_or_fails_on_refusals_and_releases_a_canary_weight() {
        let mut r = rollout(steps());
        let done = RolloutProgress {
            selected: 5,
            installed: 5,
            ..Default::default()
        };
        let t = r.finish(done, 30);
        assert_eq!(
            t,
            Transition::new("rollout.succeeded", Some("succeeded"), false)
        );
        assert_eq!(r.state, RolloutState::Succeeded);
        let mut r = rollout(steps());
        r.set_weight(10, 9, 0);
        let refused = RolloutProgress {
            selected: 5,
            installed: 3,
            failed: 2,
            ..Default::default()
        };
        let t = r.finish(refused, 31);
        assert_eq!(t, Transition::new("rollout.failed", Some("failed"), true));
        assert_eq!(
            r.message,
            "2 of 5 node(s) refused it; `aviary nodes get` shows why"
        );
        assert_eq!(r.weight.last().map(|w| (w.weight, w.seq)), Some((None, 31)));
        let t = r.fail("deadline".into());
        assert_eq!(t.action, "rollout.failed");
    }
}
