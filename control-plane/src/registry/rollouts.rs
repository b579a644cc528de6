//! Deployments: created, changed by the engine and admins, aborted, finished — each
//! change committed with its audit event before any node hears of it.

use aviary_certs::Identity;

use super::progress::{completed, progress};
use super::weights::republish;
use super::Registry;
use crate::audit::{now_ms, NewEvent};
use crate::deploy::{DeployState, Deployment, ScaleChange, Step, WeightChange};
use crate::error::ControlPlaneError;
use crate::selector::Selector;
use crate::store::Change;

/// What `create_deployment` is asked for.
#[derive(Clone, Debug)]
pub(crate) struct NewDeployment {
    /// Module.
    pub module: String,
    /// Release version (uploaded).
    pub version: String,
    /// Which nodes.
    pub selector: Selector,
    /// Canary steps; none = everywhere at once.
    pub steps: Vec<Step>,
    /// Seconds a step may wait on nodes (0 = forever).
    pub progress_deadline_seconds: u32,
}

impl Registry {
    /// Deploys `module` `version` to every node `selector` matches, now and when they
    /// join. At most one deployment of a module is in progress at a time.
    pub(crate) async fn create_deployment(
        &self,
        actor: &Identity,
        plan: NewDeployment,
    ) -> Result<Deployment, ControlPlaneError> {
        let NewDeployment {
            module,
            version,
            selector,
            steps,
            progress_deadline_seconds,
        } = plan;
        let (module, version) = (module.as_str(), version.as_str());
        let _writer = self.writer.lock().await;
        let deployment = {
            let st = self.state();
            if let Some(busy) = st
                .deployments
                .iter()
                .find(|d| d.module == module && d.state.is_active())
            {
                return Err(ControlPlaneError::FailedPrecondition(format!(
                    "rollout {} of {module} {} is in progress; abort it or wait for it",
                    busy.id, busy.version
                )));
            }
            let seq = st.revision + 1;
            let now = now_ms();
            Deployment {
                id: format!("r-{seq}"),
                seq,
                module: module.to_owned(),
                version: version.to_owned(),
                selector,
                state: DeployState::Progressing,
                abort_seq: 0,
                message: if steps.is_empty() {
                    "deploying to every selected node".into()
                } else {
                    format!("step 1 of {}", steps.len())
                },
                created_ms: now,
                updated_ms: now,
                // No steps: everywhere, from this revision on.
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
                step_started_ms: now,
                progress_deadline_seconds,
                weight: Vec::new(),
                analysis_failures: 0,
            }
        };
        // Persisted before any node hears of it.
        self.commit(Change {
            deployments: vec![deployment.clone()],
            revision: Some(deployment.seq),
            events: vec![NewEvent::new(
                actor.to_string(),
                "rollout.created",
                format!("rollout/{}", deployment.id),
                format!(
                    "{} {} to selector {:?}",
                    module,
                    version,
                    deployment.selector.to_string()
                ),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        metrics::counter!("aviary_rollout_transitions_total", "to" => "progressing").increment(1);
        let mut st = self.state();
        st.revision = deployment.seq;
        st.deployments.push(deployment.clone());
        let updates = republish(&mut st, &deployment.selector, self.ttl_seconds);
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(deployment)
    }

    /// Aborts a deployment in progress: its nodes go back to their previous slot.
    pub(crate) async fn abort_deployment(
        &self,
        actor: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<Deployment, ControlPlaneError> {
        let deployment = self
            .update_deployment(&actor.to_string(), id, "rollout.aborted", |d, seq| {
                if !d.state.is_active() {
                    return Err(ControlPlaneError::FailedPrecondition(format!(
                        "rollout {id} is {:?}, only a rollout in progress can be aborted",
                        d.state
                    )));
                }
                // The abort takes a revision of its own: canaries go back on it.
                d.state = DeployState::Aborted;
                d.abort_seq = seq;
                d.message = format!("aborted: {reason}");
                Ok(true)
            })
            .await?;
        metrics::counter!("aviary_rollout_transitions_total", "to" => "aborted").increment(1);
        Ok(deployment)
    }

    /// Changes deployment `id` (the engine's step transitions, promote, pause, resume):
    /// `change` gets the deployment and the next revision and says whether it moved the
    /// canary scale (which takes that revision). Persisted, with its audit event, before
    /// any node hears of it.
    pub(crate) async fn update_deployment(
        &self,
        actor: &str,
        id: &str,
        action: &str,
        change: impl FnOnce(&mut Deployment, u64) -> Result<bool, ControlPlaneError>,
    ) -> Result<Deployment, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (deployment, scaled, next) = {
            let st = self.state();
            let mut d = st
                .deployments
                .iter()
                .find(|d| d.id == id)
                .cloned()
                .ok_or_else(|| ControlPlaneError::NotFound(format!("rollout {id}")))?;
            let next = st.revision + 1;
            let scaled = change(&mut d, next)?;
            d.updated_ms = now_ms();
            (d, scaled, next)
        };
        self.commit(Change {
            deployments: vec![deployment.clone()],
            revision: scaled.then_some(next),
            events: vec![NewEvent::new(
                actor.to_owned(),
                action,
                format!("rollout/{id}"),
                deployment.message.clone(),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        let mut st = self.state();
        if scaled {
            st.revision = st.revision.max(next);
        }
        if let Some(d) = st.deployments.iter_mut().find(|d| d.id == id) {
            *d = deployment.clone();
        }
        let updates = if scaled {
            republish(&mut st, &deployment.selector, self.ttl_seconds)
        } else {
            Vec::new()
        };
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(deployment)
    }

    /// Completes the active deployment of `module` if every node has answered.
    pub(crate) async fn check_complete(&self, module: &str) {
        let done = completed(&self.state(), module);
        if let Some(d) = done {
            self.finish_deployment(d).await;
        }
    }

    async fn finish_deployment(&self, mut d: Deployment) {
        let _writer = self.writer.lock().await;
        if !self
            .state()
            .deployments
            .iter()
            .any(|x| x.id == d.id && x.state.is_active())
        {
            return;
        }
        let p = progress(&self.state(), &d);
        d.updated_ms = now_ms();
        if p.failed == 0 {
            d.state = DeployState::Succeeded;
            d.message = "every selected node installed it (or was skipped)".into();
        } else {
            d.state = DeployState::Failed;
            d.message = format!(
                "{} of {} node(s) refused it; `aviary nodes get` shows why",
                p.failed, p.selected
            );
        }
        let (action, to) = match d.state {
            DeployState::Succeeded => ("rollout.succeeded", "succeeded"),
            _ => ("rollout.failed", "failed"),
        };
        // The canary weight ends with the rollout: back to the rules, at a new revision.
        let release = d.weight.last().is_some_and(|w| w.weight.is_some());
        let next = self.state().revision + 1;
        if release {
            d.weight.push(WeightChange {
                weight: None,
                seq: next,
            });
        }
        let result = self
            .commit(Change {
                deployments: vec![d.clone()],
                revision: release.then_some(next),
                events: vec![NewEvent::new(
                    "control-plane",
                    action,
                    format!("rollout/{}", d.id),
                    format!("{} {}: {}", d.module, d.version, d.message),
                )],
                durable: true,
                ..Default::default()
            })
            .await;
        match result {
            Ok(_) => {
                metrics::counter!("aviary_rollout_transitions_total", "to" => to).increment(1);
                let mut st = self.state();
                if release {
                    st.revision = st.revision.max(next);
                }
                let selector = d.selector.clone();
                if let Some(x) = st.deployments.iter_mut().find(|x| x.id == d.id) {
                    *x = d;
                }
                let updates = if release {
                    republish(&mut st, &selector, self.ttl_seconds)
                } else {
                    Vec::new()
                };
                drop(st);
                for u in updates {
                    let _ = self.weights.send(u);
                }
            }
            Err(e) => tracing::warn!(error = %e, rollout = %d.id, "could not record the outcome"),
        }
    }
}
