//! `aviary.v1.Rollouts`: rollouts everywhere at once or in canary steps (scale and pause;
//! `rollout.rs` carries them out), pause, resume, promote, abort and watch.

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::rollouts_server::Rollouts;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use aviary_certs::Identity;

use super::caller;
use super::page::Pager;
use super::requests::{bare, mismatch, Begin, Requests};
use super::views::timestamp;
use crate::audit::now_ms;
use crate::catalog::Catalog;
use crate::error::{bad_field, ControlPlaneError};
use crate::registry::{NewRollout, Registry};
use crate::requests::Answered;
use crate::rollout::{Rollout, RolloutProgress, RolloutState, Step, Transition};
use crate::selector::Selector;

/// The Rollouts service.
pub(crate) struct RolloutsApi {
    registry: Arc<Registry>,
    catalog: Arc<Catalog>,
    pager: Arc<Pager>,
    requests: Arc<Requests>,
}

impl RolloutsApi {
    /// Serves rollouts of `catalog` releases over `registry`'s nodes.
    pub(crate) fn new(
        registry: Arc<Registry>,
        catalog: Arc<Catalog>,
        pager: Arc<Pager>,
        requests: Arc<Requests>,
    ) -> RolloutsApi {
        RolloutsApi {
            registry,
            catalog,
            pager,
            requests,
        }
    }
}

/// Validates the wire steps into the engine's.
fn steps_of(steps: &[pb::Step]) -> Result<Vec<Step>, Status> {
    use pb::step::Kind;
    let mut out = Vec::with_capacity(steps.len());
    let mut scale = 0;
    for (i, s) in steps.iter().enumerate() {
        match &s.kind {
            Some(Kind::SetCanaryScale(c)) => {
                if c.percent == 0 || c.percent > 100 || c.percent < scale {
                    return Err(bad_field("steps", format!(
                        "step {}: canary scale {} must be 1..=100 and not below the previous {scale}",
                        i + 1,
                        c.percent
                    )));
                }
                scale = c.percent;
                out.push(Step::CanaryScale(c.percent));
            }
            Some(Kind::Pause(p)) => out.push(Step::Pause(p.seconds)),
            Some(Kind::SetWeight(w)) => {
                if w.weight > crate::node::MAX_WEIGHT {
                    return Err(bad_field(
                        "steps",
                        format!(
                            "step {}: weight {} is out of range 0..=100",
                            i + 1,
                            w.weight
                        ),
                    ));
                }
                out.push(Step::Weight(w.weight));
            }
            Some(Kind::Analysis(a)) => {
                let bad = |what: &str| {
                    Err(bad_field(
                        "steps",
                        format!("step {} (analysis): {what}", i + 1),
                    ))
                };
                if a.window_seconds == 0 {
                    return bad("window_seconds must be at least 1");
                }
                // Checked here, where they enter: a NaN or infinity must never reach a
                // stored record (see `finite`).
                use aviary_proto::finite::check;
                let checked = check("max_error_rate", a.max_error_rate, 0.0..=1.0)
                    .and(check(
                        "max_error_rate_vs_baseline",
                        a.max_error_rate_vs_baseline,
                        0.0..=1.0,
                    ))
                    .and(check(
                        "min_healthy_percent",
                        a.min_healthy_percent,
                        0.0..=100.0,
                    ))
                    .and(check(
                        "max_p99_latency_ms",
                        a.max_p99_latency_ms,
                        0.0..=f64::MAX,
                    ));
                if let Err(e) = checked {
                    return bad(&e);
                }
                out.push(Step::Analysis(crate::analysis::AnalysisSpec {
                    window_seconds: a.window_seconds,
                    max_error_rate: a.max_error_rate,
                    max_p99_latency_ms: a.max_p99_latency_ms,
                    max_log_matches: a.max_log_matches,
                    min_healthy_percent: a.min_healthy_percent,
                    max_error_rate_vs_baseline: a.max_error_rate_vs_baseline,
                    min_reports: a.min_reports,
                    failure_limit: a.failure_limit.max(1),
                }));
            }
            None => return Err(bad_field("steps", format!("step {} is empty", i + 1))),
        }
    }
    if out.len() > 64 {
        return Err(bad_field("steps", "at most 64 steps"));
    }
    Ok(out)
}

/// The wire form of a rollout.
fn view(d: &Rollout, p: RolloutProgress) -> pb::Rollout {
    pb::Rollout {
        id: d.id.clone(),
        module: d.module.clone(),
        version: d.version.clone(),
        selector: d.selector.to_string(),
        state: match d.state {
            RolloutState::Progressing => pb::RolloutState::Progressing,
            RolloutState::Paused => pb::RolloutState::Paused,
            RolloutState::Succeeded => pb::RolloutState::Succeeded,
            RolloutState::Aborted => pb::RolloutState::Aborted,
            RolloutState::Failed => pb::RolloutState::Failed,
        } as i32,
        current_step: d.current_step,
        steps: d
            .steps
            .iter()
            .map(|s| pb::Step {
                kind: Some(match s {
                    Step::CanaryScale(p) => {
                        pb::step::Kind::SetCanaryScale(pb::SetCanaryScale { percent: *p })
                    }
                    Step::Pause(secs) => pb::step::Kind::Pause(pb::Pause { seconds: *secs }),
                    Step::Weight(w) => pb::step::Kind::SetWeight(pb::SetWeight { weight: *w }),
                    Step::Analysis(a) => pb::step::Kind::Analysis(pb::Analysis {
                        window_seconds: a.window_seconds,
                        max_error_rate: a.max_error_rate,
                        max_p99_latency_ms: a.max_p99_latency_ms,
                        max_log_matches: a.max_log_matches,
                        min_healthy_percent: a.min_healthy_percent,
                        max_error_rate_vs_baseline: a.max_error_rate_vs_baseline,
                        min_reports: a.min_reports,
                        failure_limit: a.failure_limit,
                    }),
                }),
            })
            .collect(),
        message: if p.skipped > 0 {
            format!(
                "{} ({} node(s) skipped: no artifact for their arch)",
                d.message, p.skipped
            )
        } else {
            d.message.clone()
        },
        created_at: Some(timestamp(d.created_ms)),
        updated_at: Some(timestamp(d.updated_ms)),
        progress: Some(pb::StepProgress {
            selected: p.selected,
            canaries: p.canaries,
            installed: p.installed,
            healthy: p.healthy,
            failed: p.failed,
        }),
    }
}

impl RolloutsApi {
    /// An operator's transition of rollout `id`, committed by the registry; answers with
    /// the rollout after it.
    async fn operate(
        &self,
        actor: &Identity,
        method: &str,
        (id, request_id, body): (&str, &str, Vec<u8>),
        transition: impl FnOnce(&mut Rollout, &str, u64) -> Result<Transition, ControlPlaneError>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let begun = self.requests.begin(actor, request_id, method, body).await?;
        let id = match &begun {
            Begin::Replay(r) => match &r.answered {
                Answered::Rollout { id } => id.clone(),
                _ => return Err(mismatch(r)),
            },
            _ => {
                let name = actor.to_string();
                self.registry
                    .update_rollout_with(&name, id, "", begun.note(), |d, seq| {
                        transition(d, &name, seq)
                    })
                    .await?
                    .id
            }
        };
        let (d, p) = self.registry.rollout(&id)?;
        Ok(Response::new(view(&d, p)))
    }
}

#[tonic::async_trait]
impl Rollouts for RolloutsApi {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        let body = bare(&r, |r| r.request_id.clear());
        let begun = self
            .requests
            .begin(&actor, &r.request_id, "CreateRollout", body)
            .await?;
        if let Begin::Replay(rec) = &begun {
            let Answered::Rollout { id } = &rec.answered else {
                return Err(mismatch(rec));
            };
            let (d, p) = self.registry.rollout(id)?;
            return Ok(Response::new(view(&d, p)));
        }
        let steps = steps_of(&r.steps)?;
        aviary_proto::manifest::validate_module_name(&r.module)
            .map_err(|e| bad_field("module", e.to_string()))?;
        aviary_proto::manifest::parse_version(&r.version)
            .map_err(|e| bad_field("version", e.to_string()))?;
        let selector = Selector::parse(&r.selector)?;
        if self.catalog.get(&r.module, &r.version).await?.is_none() {
            return Err(ControlPlaneError::Conflict {
                reason: "RELEASE_NOT_UPLOADED",
                message: format!(
                    "release {} {} is not uploaded (aviary release upload)",
                    r.module, r.version
                ),
                metadata: vec![("module", r.module.clone()), ("version", r.version.clone())],
            }
            .into());
        }
        let d = self
            .registry
            .create_rollout(
                &actor,
                NewRollout {
                    module: r.module.clone(),
                    version: r.version.clone(),
                    selector,
                    steps,
                    progress_deadline_seconds: r.progress_deadline_seconds,
                },
                begun.note(),
            )
            .await?;
        let (d, p) = self.registry.rollout(&d.id)?;
        Ok(Response::new(view(&d, p)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let (d, p) = self.registry.rollout(&request.get_ref().id)?;
        Ok(Response::new(view(&d, p)))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let req = request.into_inner();
        let want =
            self.pager
                .request("rollouts", &req.module, req.page_size, &req.page_token, 100)?;
        let module = Some(req.module.as_str()).filter(|m| !m.is_empty());
        // Newest first: a page continues with older ones (smaller seq). One more than the
        // page: whether another follows.
        let before = want.after.as_deref().and_then(|a| a.parse::<u64>().ok());
        let page = self.pager.page(
            "rollouts",
            &req.module,
            &want,
            self.registry.rollouts(module, before, want.size + 1),
            |(d, _)| d.seq.to_string(),
            |(d, _), after| after.parse::<u64>().is_ok_and(|s| d.seq < s),
        );
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: page.items.iter().map(|(d, p)| view(d, *p)).collect(),
            next_page_token: page.next,
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        let body = bare(&r, |r| r.request_id.clear());
        self.operate(
            &actor,
            "PauseRollout",
            (&r.id, &r.request_id, body),
            |d, who, _| Ok(d.pause(who)?),
        )
        .await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        let body = bare(&r, |r| r.request_id.clear());
        self.operate(
            &actor,
            "ResumeRollout",
            (&r.id, &r.request_id, body),
            |d, who, _| Ok(d.resume(who, now_ms())?),
        )
        .await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        let body = bare(&r, |r| r.request_id.clear());
        let full = r.full;
        self.operate(
            &actor,
            "PromoteRollout",
            (&r.id, &r.request_id, body),
            |d, who, _| Ok(d.promote(who, full, now_ms())?),
        )
        .await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        let body = bare(&r, |r| r.request_id.clear());
        self.operate(
            &actor,
            "AbortRollout",
            (&r.id, &r.request_id, body),
            |d, _, seq| Ok(d.abort("aborted: aborted by operator".into(), seq)?),
        )
        .await
    }

    type WatchRolloutStream = ReceiverStream<Result<pb::Rollout, Status>>;
    async fn watch_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let id = request.into_inner().id;
        let (d, p) = self.registry.rollout(&id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let registry = self.registry.clone();
        tokio::spawn(async move {
            // The rollout now, then every change of state, step or node counts; the stream
            // ends after a final state.
            let mut active = d.state.is_active();
            let mut last = view(&d, p);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                if !active {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let Ok((d, p)) = registry.rollout(&id) else {
                    return;
                };
                active = d.state.is_active();
                let mut now = view(&d, p);
                // Timestamps alone are no news.
                now.updated_at = last.updated_at;
                if now != last {
                    now.updated_at = view(&d, p).updated_at;
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::step::Kind;

    fn step(kind: Kind) -> pb::Step {
        pb::Step { kind: Some(kind) }
    }

    fn scale(percent: u32) -> pb::Step {
        step(Kind::SetCanaryScale(pb::SetCanaryScale { percent }))
    }

    #[test]
    fn wire_steps_become_engine_steps_and_bad_ones_name_their_position() {
        let ok = steps_of(&[
            scale(20),
            step(Kind::Pause(pb::Pause { seconds: 0 })),
            step(Kind::SetWeight(pb::SetWeight { weight: 10 })),
            scale(100),
        ]);
        assert_eq!(
            ok.ok(),
            Some(vec![
                Step::CanaryScale(20),
                Step::Pause(0),
                Step::Weight(10),
                Step::CanaryScale(100)
            ])
        );
        let refused = |steps: &[pb::Step]| steps_of(steps).err().map(|s| s.message().to_owned());
        let shrink = refused(&[scale(50), scale(20)]).unwrap_or_default();
        assert!(shrink.starts_with("step 2:"), "{shrink}");
        assert!(refused(&[scale(0)]).is_some());
        assert!(refused(&[scale(101)]).is_some());
        let heavy = refused(&[step(Kind::SetWeight(pb::SetWeight { weight: 101 }))]);
        assert!(heavy.is_some_and(|m| m.contains("out of range")));
        assert!(refused(&[pb::Step { kind: None }]).is_some_and(|m| m == "step 1 is empty"));
        let many: Vec<pb::Step> = (0..65).map(|_| scale(100)).collect();
        assert_eq!(refused(&many).as_deref(), Some("at most 64 steps"));
    }

    #[test]
    fn the_view_names_skipped_nodes_and_maps_every_state() {
        let mut r = Rollout::new(
            3,
            "gateway".into(),
            "1.0.0".into(),
            Selector::default(),
            Vec::new(),
            0,
            5_000,
        );
        let p = RolloutProgress {
            selected: 3,
            installed: 2,
            skipped: 1,
            ..Default::default()
        };
        let v = view(&r, p);
        assert_eq!(v.id, "r-3");
        assert_eq!(v.state, pb::RolloutState::Progressing as i32);
        assert!(v
            .message
            .ends_with("(1 node(s) skipped: no artifact for their arch)"));
        r.state = RolloutState::Aborted;
        assert_eq!(view(&r, p).state, pb::RolloutState::Aborted as i32);
    }
}
