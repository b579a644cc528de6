//! The rollout engine: carries out the canary steps of every progressing rollout. Each
//! tick it decides (`next`, a pure function of the record, its node counts and the time)
//! which transition the current step needs, and has the registry commit it.
//!
//! The engine holds no state of its own: each tick reads the rollouts from the registry,
//! and every transition is committed (durably, with an audit event) before nodes hear of
//! it. A restarted control plane therefore resumes where it stood: a timed pause keeps its
//! start time, a scale step re-checks its canaries, and no step runs twice.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::model::{Rollout, Step};
use super::RolloutProgress;
use crate::analysis::{judge, AnalysisSpec, Judgement};
use crate::audit::now_ms;
use crate::registry::Registry;

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
            let span = tracing::info_span!(
                "rollout_step",
                rollout_id = %d.id,
                module = %d.module,
                version = %d.version,
                step = d.current_step + 1
            );
            let step = tracing::Instrument::instrument(advance(&registry, &d, p), span.clone());
            if let Err(e) = step.await {
                span.in_scope(|| tracing::warn!(error = %e, "rollout step failed to commit"));
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

fn next(d: &Rollout, p: RolloutProgress, now: u64) -> Next {
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
    d: &Rollout,
    p: RolloutProgress,
) -> Result<(), crate::error::ControlPlaneError> {
    let id = d.id.as_str();
    match next(d, p, now_ms()) {
        Next::Scale(percent) => {
            let cutoff = registry.canary_cutoff(d, percent);
            registry
                .update_rollout(ENGINE, id, |d, seq| Ok(d.scale(percent, cutoff, seq)))
                .await?;
        }
        Next::Weight(weight) => {
            registry
                .update_rollout(ENGINE, id, |d, seq| Ok(d.set_weight(weight, seq, now_ms())))
                .await?;
        }
        Next::Judge(spec) => {
            let span = tracing::info_span!("analysis", window_s = spec.window_seconds);
            let figures = registry.figures(d, d.step_started_ms);
            let json = serde_json::to_string(&figures).unwrap_or_default();
            let judgement = judge(&spec, &figures);
            span.in_scope(|| tracing::info!(?judgement, figures = %json, "analysis judged"));
            let words = figures.to_string();
            let commit = judged(registry, d, &spec, judgement, &words, &json);
            tracing::Instrument::instrument(commit, span).await?;
        }
        Next::Advance(done) => {
            registry
                .update_rollout(ENGINE, id, |d, _| Ok(d.advance(&done, now_ms())))
                .await?;
        }
        Next::Hold => {
            registry
                .update_rollout(ENGINE, id, |d, _| Ok(d.hold()))
                .await?;
        }
        Next::Fail(why) => {
            registry
                .update_rollout(ENGINE, id, |d, _| Ok(d.fail(why)))
                .await?;
        }
        Next::Abort(why) => {
            // Canaries back to the previous slot, weights to stable.
            registry
                .update_rollout(ENGINE, id, |d, seq| Ok(d.abort(why, seq)?))
                .await?;
        }
        Next::Wait => registry.check_complete(&d.module).await,
    }
    Ok(())
}

/// Commits what an analysis window's `judgement` calls for.
async fn judged(
    registry: &Registry,
    d: &Rollout,
    spec: &AnalysisSpec,
    judgement: Judgement,
    numbers: &str,
    json: &str,
) -> Result<(), crate::error::ControlPlaneError> {
    let id = d.id.as_str();
    // The message says the figures in words; the audit event also keeps them as JSON.
    let note = format!("figures {json}");
    match judgement {
        Judgement::Successful => {
            registry
                .update_rollout_noting(ENGINE, id, &note, |d, _| {
                    Ok(d.analysis_passed(numbers, now_ms()))
                })
                .await?;
        }
        Judgement::Failed(reasons) => {
            let reasons = reasons.join("; ");
            let limit = spec.failure_limit.max(1);
            registry
                .update_rollout_noting(ENGINE, id, &note, |d, seq| {
                    Ok(d.analysis_failed(&reasons, numbers, limit, seq, now_ms()))
                })
                .await?;
        }
        Judgement::Inconclusive(why) => {
            // Not enough data: keep measuring until the deadline (or three windows),
            // then hold with the reason for an operator.
            let waited = now_ms().saturating_sub(d.step_started_ms);
            let limit_ms = if d.progress_deadline_seconds > 0 {
                u64::from(d.progress_deadline_seconds) * 1000
            } else {
                u64::from(spec.window_seconds) * 3000
            };
            if waited >= limit_ms {
                registry
                    .update_rollout_noting(ENGINE, id, &note, |d, _| {
                        Ok(d.inconclusive(&why, numbers))
                    })
                    .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rollout::model::sample as rollout;

    fn counts(installed: u32, failed: u32, connected: u32) -> RolloutProgress {
        RolloutProgress {
            selected: 10,
            canaries: connected,
            connected_canaries: connected,
            installed,
            failed,
            skipped: 0,
            healthy: 0,
        }
    }

    #[test]
    fn a_scale_step_scales_then_waits_for_connected_canaries_and_judges_their_answers() {
        let mut r = rollout(vec![Step::CanaryScale(20), Step::Pause(30)]);
        assert!(matches!(next(&r, counts(0, 0, 0), 1_000), Next::Scale(20)));
        r.scale(20, 2_000, 8);
        assert!(matches!(next(&r, counts(0, 0, 2), 1_000), Next::Wait));
        assert!(matches!(next(&r, counts(2, 0, 2), 1_000), Next::Advance(_)));
        assert!(matches!(next(&r, counts(1, 1, 2), 1_000), Next::Abort(_)));
        // Past the 60 s deadline with a canary still silent.
        assert!(matches!(next(&r, counts(1, 0, 2), 62_000), Next::Fail(_)));
    }

    #[test]
    fn pauses_weights_and_analysis_wait_for_their_time_and_the_end_scales_to_everyone() {
        let mut r = rollout(vec![
            Step::Pause(30),
            Step::Pause(0),
            Step::Weight(10),
            Step::Analysis(AnalysisSpec {
                window_seconds: 10,
                ..Default::default()
            }),
        ]);
        assert!(matches!(next(&r, counts(0, 0, 0), 20_000), Next::Wait));
        assert!(matches!(
            next(&r, counts(0, 0, 0), 31_000),
            Next::Advance(_)
        ));
        r.advance("paused 30s", 31_000);
        assert!(matches!(next(&r, counts(0, 0, 0), 31_000), Next::Hold));
        r.current_step = 2;
        assert!(matches!(
            next(&r, counts(0, 0, 0), 31_000),
            Next::Weight(10)
        ));
        r.set_weight(10, 9, 40_000);
        assert!(matches!(next(&r, counts(0, 0, 0), 45_000), Next::Wait));
        assert!(matches!(next(&r, counts(0, 0, 0), 50_000), Next::Judge(_)));
        r.analysis_passed("{}", 50_000);
        assert!(matches!(
            next(&r, counts(0, 0, 0), 50_000),
            Next::Scale(100)
        ));
        r.scale(100, 10_000, 10);
        assert!(matches!(next(&r, counts(5, 0, 10), 50_000), Next::Wait));
        assert!(matches!(next(&r, counts(5, 0, 10), 200_000), Next::Fail(_)));
    }
}
