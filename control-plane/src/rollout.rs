//! The rollout engine: carries out the canary steps of every progressing rollout.
//!
//! ```text
//!              ┌──────── promote / resume ────────┐
//!              ▼                                   │
//!   Progressing ── pause step (0 s) / PauseRollout ─► Paused
//!        │  ├─ canary scale p: scale → p, wait until every canary installed it
//!        │  ├─ set weight w: the canaries' module weight is w until the rollout ends
//!        │  ├─ pause s: wait s seconds
//!        │  ├─ analysis: judge canaries vs stable over a window; failed → Aborted,
//!        │  │            too little data by the deadline → Paused
//!        │  └─ steps done: scale → 100, wait for every node
//!        ├──► Succeeded (every node installed or skipped)
//!        ├──► Failed (nodes refused it, or a step missed its progress deadline)
//!        └──► Aborted (AbortRollout: canaries go back)
//! ```
//! The engine holds no state of its own: each tick reads the rollouts from the registry,
//! and every transition is committed (durably, with an audit event) before nodes hear of
//! it. A restarted control plane therefore resumes where it stood: a timed pause keeps its
//! start time, a scale step re-checks its canaries, and no step runs twice.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::analysis::{judge, AnalysisSpec, Judgement};
use crate::audit::now_ms;
use crate::deploy::{DeployState, Deployment, ScaleChange, Step, WeightChange};
use crate::registry::{DeployProgress, Registry};

/// How often the engine looks at the rollouts.
const TICK: Duration = Duration::from_millis(200);

/// Who the audit log names for the engine's own transitions.
const ENGINE: &str = "control-plane/rollouts";

/// Runs until `shutdown`.
pub(crate) async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (d, p) in registry.progressing() {
            if let Err(e) = advance(&registry, &d, p).await {
                tracing::warn!(rollout = %d.id, error = %e, "rollout step failed to commit");
            }
        }
    }
}

/// What the current step needs, if anything.
enum Next {
    /// Move the canary scale to this percent.
    Scale(u32),
    /// Give the canaries this weight, and go on.
    Weight(u32),
    /// The analysis window is over: judge it.
    Judge(AnalysisSpec),
    /// The step is done: go to the next.
    Advance(String),
    /// Hold until promoted.
    Hold,
    /// The step waited on nodes past its deadline.
    Fail(String),
    /// Canaries could not run the version: send them back.
    Abort(String),
    /// Nothing to do yet.
    Wait,
}

fn next(d: &Deployment, p: DeployProgress, now: u64) -> Next {
    let step = d.current_step as usize;
    let elapsed_ms = now.saturating_sub(d.step_started_ms);
    let overdue = d.progress_deadline_seconds > 0
        && elapsed_ms > u64::from(d.progress_deadline_seconds) * 1000;
    // Offline canaries do not hold a step: they get their version when they come back.
    let canaries_done = p.installed + p.skipped >= p.connected_canaries;
    match d.steps.get(step) {
        Some(Step::CanaryScale(percent)) if d.percent() < *percent => Next::Scale(*percent),
        // A canary that cannot install or start the version (crash loop, never ready: the
        // edge rolled it back and NACKed) fails the canary once every connected one
        // answered; waiting for the deadline would only keep the others on it.
        Some(Step::CanaryScale(percent))
            if p.failed > 0 && p.installed + p.skipped + p.failed >= p.connected_canaries =>
        {
            Next::Abort(format!(
                "aborted: {percent}% canary: {} of {} canary node(s) failed to install or start the version",
                p.failed, p.canaries
            ))
        }
        Some(Step::CanaryScale(percent)) if canaries_done => Next::Advance(format!(
            "{percent}% canary: {} of {} node(s) installed",
            p.installed, p.canaries
        )),
        Some(Step::CanaryScale(percent)) if overdue => Next::Fail(format!(
            "{percent}% canary: only {} of {} node(s) installed within the {}s progress deadline",
            p.installed, p.canaries, d.progress_deadline_seconds
        )),
        Some(Step::CanaryScale(_)) => Next::Wait,
        Some(Step::Weight(w)) => Next::Weight(*w),
        Some(Step::Analysis(a)) if elapsed_ms >= u64::from(a.window_seconds) * 1000 => {
            Next::Judge(a.clone())
        }
        Some(Step::Analysis(_)) => Next::Wait,
        Some(Step::Pause(0)) => Next::Hold,
        Some(Step::Pause(secs)) if elapsed_ms >= u64::from(*secs) * 1000 => {
            Next::Advance(format!("paused {secs}s"))
        }
        Some(Step::Pause(_)) => Next::Wait,
        // All steps done: everyone, then the registry completes it on the last answer.
        None if d.percent() < 100 => Next::Scale(100),
        None if overdue && p.installed + p.skipped + p.failed < p.selected => Next::Fail(format!(
            "only {} of {} node(s) installed within the {}s progress deadline",
            p.installed, p.selected, d.progress_deadline_seconds
        )),
        None => Next::Wait,
    }
}

async fn advance(
    registry: &Registry,
    d: &Deployment,
    p: DeployProgress,
) -> Result<(), crate::error::ControlPlaneError> {
    let total = d.steps.len();
    match next(d, p, now_ms()) {
        Next::Scale(percent) => {
            let cutoff = registry.canary_cutoff(d, percent);
            registry
                .update_deployment(ENGINE, &d.id, "rollout.step", |d, seq| {
                    d.scale.push(ScaleChange {
                        percent,
                        seq,
                        cutoff,
                    });
                    d.message = if (d.current_step as usize) < d.steps.len() {
                        format!(
                            "step {} of {total}: canary scale {percent}%",
                            d.current_step + 1
                        )
                    } else {
                        "all steps done: every selected node".into()
                    };
                    Ok(true)
                })
                .await?;
            metrics::counter!("aviary_rollout_transitions_total", "to" => "step").increment(1);
        }
        Next::Weight(weight) => {
            registry
                .update_deployment(ENGINE, &d.id, "rollout.step", |d, seq| {
                    d.weight.push(WeightChange {
                        weight: Some(weight),
                        seq,
                    });
                    d.current_step += 1;
                    d.step_started_ms = now_ms();
                    d.message = format!(
                        "step {} of {total} done: canary weight {weight}",
                        d.current_step
                    );
                    Ok(true)
                })
                .await?;
        }
        Next::Judge(spec) => {
            let figures = registry.figures(d, d.step_started_ms);
            let numbers = serde_json::to_string(&figures).unwrap_or_default();
            match judge(&spec, &figures) {
                Judgement::Successful => {
                    registry
                        .update_deployment(ENGINE, &d.id, "rollout.analysis", |d, _| {
                            d.current_step += 1;
                            d.step_started_ms = now_ms();
                            d.analysis_failures = 0;
                            d.message = format!("analysis passed: {numbers}");
                            Ok(false)
                        })
                        .await?;
                    metrics::counter!("aviary_rollout_transitions_total", "to" => "analysis_passed")
                        .increment(1);
                }
                Judgement::Failed(reasons) => {
                    let reasons = reasons.join("; ");
                    let limit = spec.failure_limit.max(1);
                    registry
                        .update_deployment(ENGINE, &d.id, "rollout.analysis", |d, seq| {
                            d.analysis_failures += 1;
                            if d.analysis_failures >= limit {
                                // Canaries back to the previous slot, weights to stable.
                                d.state = DeployState::Aborted;
                                d.abort_seq = seq;
                                d.message = format!(
                                    "aborted: analysis failed {} time(s): {reasons}; figures {numbers}",
                                    d.analysis_failures
                                );
                                Ok(true)
                            } else {
                                d.step_started_ms = now_ms();
                                d.message = format!(
                                    "analysis failed ({} of {limit}): {reasons}; figures {numbers}",
                                    d.analysis_failures
                                );
                                Ok(false)
                            }
                        })
                        .await?;
                    metrics::counter!("aviary_rollout_transitions_total", "to" => "analysis_failed")
                        .increment(1);
                }
                Judgement::Inconclusive(why) => {
                    // Not enough data: keep measuring until the deadline (or three
                    // windows), then hold with the reason for an operator.
                    let waited = now_ms().saturating_sub(d.step_started_ms);
                    let limit_ms = if d.progress_deadline_seconds > 0 {
                        u64::from(d.progress_deadline_seconds) * 1000
                    } else {
                        u64::from(spec.window_seconds) * 3000
                    };
                    if waited >= limit_ms {
                        registry
                            .update_deployment(ENGINE, &d.id, "rollout.paused", |d, _| {
                                d.state = DeployState::Paused;
                                d.message =
                                    format!("analysis inconclusive: {why}; figures {numbers}");
                                Ok(false)
                            })
                            .await?;
                    }
                }
            }
        }
        Next::Advance(done) => {
            registry
                .update_deployment(ENGINE, &d.id, "rollout.step", |d, _| {
                    d.current_step += 1;
                    d.step_started_ms = now_ms();
                    d.message = format!("step {} of {total} done ({done})", d.current_step);
                    Ok(false)
                })
                .await?;
        }
        Next::Hold => {
            registry
                .update_deployment(ENGINE, &d.id, "rollout.paused", |d, _| {
                    d.state = DeployState::Paused;
                    d.message = format!(
                        "paused at step {} of {total} until promoted",
                        d.current_step + 1
                    );
                    Ok(false)
                })
                .await?;
            metrics::counter!("aviary_rollout_transitions_total", "to" => "paused").increment(1);
        }
        Next::Fail(why) => {
            registry
                .update_deployment(ENGINE, &d.id, "rollout.failed", |d, _| {
                    d.state = DeployState::Failed;
                    d.message = why.clone();
                    Ok(false)
                })
                .await?;
            metrics::counter!("aviary_rollout_transitions_total", "to" => "failed").increment(1);
        }
        Next::Abort(why) => {
            registry
                .update_deployment(ENGINE, &d.id, "rollout.aborted", |d, seq| {
                    // Canaries back to the previous slot, weights to stable.
                    d.state = DeployState::Aborted;
                    d.abort_seq = seq;
                    d.message = why.clone();
                    Ok(true)
                })
                .await?;
            metrics::counter!("aviary_rollout_transitions_total", "to" => "aborted").increment(1);
        }
        Next::Wait => registry.check_complete(&d.module).await,
    }
    Ok(())
}
