//! Rollouts: created, then moved by the transitions of `rollout/transition.rs` — each
//! committed here with its audit event before any node hears of it.

use aviary_certs::Identity;

use super::progress::{completed, progress};
use super::weights::republish;
use super::Registry;
use crate::audit::{now_ms, NewEvent};
use crate::error::ControlPlaneError;
use crate::requests::{Answered, RequestNote};
use crate::rollout::{Refused, Rollout, Step, Transition};
use crate::selector::Selector;
use crate::store::Change;

/// What `create_rollout` is asked for.
#[derive(Clone, Debug)]
pub(crate) struct NewRollout {
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

impl From<Refused> for ControlPlaneError {
    fn from(r: Refused) -> ControlPlaneError {
        ControlPlaneError::Conflict {
            reason: "ROLLOUT_STATE",
            message: r.to_string(),
            metadata: vec![("rollout_id", r.id), ("state", format!("{:?}", r.state))],
        }
    }
}

impl Registry {
    /// Deploys `module` `version` to every node `selector` matches, now and when they
    /// join. At most one rollout of a module is in progress at a time.
    pub(crate) async fn create_rollout(
        &self,
        actor: &Identity,
        plan: NewRollout,
        request: Option<RequestNote>,
    ) -> Result<Rollout, ControlPlaneError> {
        let NewRollout {
            module,
            version,
            selector,
            steps,
            progress_deadline_seconds,
        } = plan;
        let _writer = self.writer.lock().await;
        let rollout = {
            let st = self.state();
            if let Some(busy) = st
                .rollouts
                .iter()
                .find(|d| d.module == module && d.state.is_active())
            {
                return Err(ControlPlaneError::Conflict {
                    reason: "ROLLOUT_IN_PROGRESS",
                    message: format!(
                        "rollout {} of {module} {} is in progress; abort it or wait for it",
                        busy.id, busy.version
                    ),
                    metadata: vec![
                        ("rollout_id", busy.id.clone()),
                        ("module", module.clone()),
                        ("version", busy.version.clone()),
                    ],
                });
            }
            let seq = st.revision + 1;
            Rollout::new(
                seq,
                module,
                version,
                selector,
                steps,
                progress_deadline_seconds,
                now_ms(),
            )
        };
        let id = rollout.id.clone();
        // Persisted before any node hears of it.
        self.commit(Change {
            rollouts: vec![rollout.clone()],
            request: request.map(|n| n.answered(Answered::Rollout { id }, now_ms())),
            revision: Some(rollout.seq),
            events: vec![NewEvent::new(
                actor.to_string(),
                "rollout.created",
                format!("rollout/{}", rollout.id),
                format!(
                    "{} {} to selector {:?}",
                    rollout.module,
                    rollout.version,
                    rollout.selector.to_string()
                ),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        metrics::counter!("aviary_rollout_transitions_total", "to" => "progressing").increment(1);
        let mut st = self.state();
        st.revision = rollout.seq;
        st.rollouts.push(rollout.clone());
        let updates = republish(&mut st, &rollout.selector, self.ttl_seconds);
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(rollout)
    }

    /// Moves rollout `id` by one transition: `transition` gets the rollout and the next
    /// revision (which it may take). Persisted, with its audit event, before any node
    /// hears of it.
    pub(crate) async fn update_rollout(
        &self,
        actor: &str,
        id: &str,
        transition: impl FnOnce(&mut Rollout, u64) -> Result<Transition, ControlPlaneError>,
    ) -> Result<Rollout, ControlPlaneError> {
        self.update_rollout_noting(actor, id, "", transition).await
    }

    /// Like `update_rollout`, with `note` added to the audit event after the message
    /// (what the record does not keep, e.g. an analysis' figures as JSON).
    pub(crate) async fn update_rollout_noting(
        &self,
        actor: &str,
        id: &str,
        note: &str,
        transition: impl FnOnce(&mut Rollout, u64) -> Result<Transition, ControlPlaneError>,
    ) -> Result<Rollout, ControlPlaneError> {
        self.update_rollout_with(actor, id, note, None, transition)
            .await
    }

    /// Like `update_rollout_noting`, answering `request` (an admin's request id).
    pub(crate) async fn update_rollout_with(
        &self,
        actor: &str,
        id: &str,
        note: &str,
        request: Option<RequestNote>,
        transition: impl FnOnce(&mut Rollout, u64) -> Result<Transition, ControlPlaneError>,
    ) -> Result<Rollout, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (mut rollout, next) = {
            let st = self.state();
            let d = st
                .rollouts
                .iter()
                .find(|d| d.id == id)
                .cloned()
                .ok_or_else(|| ControlPlaneError::NotFound(format!("rollout {id}")))?;
            (d, st.revision + 1)
        };
        let t = transition(&mut rollout, next)?;
        let detail = if note.is_empty() {
            rollout.message.clone()
        } else {
            format!("{}; {note}", rollout.message)
        };
        self.commit_transition(actor, rollout, t, detail, next, request)
            .await
    }

    /// Completes the active rollout of `module` if every node has answered.
    pub(crate) async fn check_complete(&self, module: &str) {
        let done = completed(&self.state(), module);
        if let Some(d) = done {
            let id = d.id.clone();
            if let Err(e) = self.finish_rollout(d).await {
                tracing::warn!(error = %e, rollout_id = %id, "could not record the outcome");
            }
        }
    }

    async fn finish_rollout(&self, mut d: Rollout) -> Result<(), ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (p, next) = {
            let st = self.state();
            if !st
                .rollouts
                .iter()
                .any(|x| x.id == d.id && x.state.is_active())
            {
                return Ok(());
            }
            (progress(&st, &d), st.revision + 1)
        };
        // The canary weight ends with the rollout: back to the rules, at a new revision.
        let t = d.finish(p, next);
        let detail = format!("{} {}: {}", d.module, d.version, d.message);
        self.commit_transition("control-plane", d, t, detail, next, None)
            .await
            .map(drop)
    }

    /// The one commit of a transition (the writer lock held): the record and its audit
    /// event, then the revision it took and the nodes it changed.
    async fn commit_transition(
        &self,
        actor: &str,
        mut rollout: Rollout,
        t: Transition,
        detail: String,
        next: u64,
        request: Option<RequestNote>,
    ) -> Result<Rollout, ControlPlaneError> {
        rollout.updated_ms = now_ms();
        let id = rollout.id.clone();
        self.commit(Change {
            rollouts: vec![rollout.clone()],
            request: request.map(|n| n.answered(Answered::Rollout { id }, now_ms())),
            revision: t.takes_revision.then_some(next),
            events: vec![NewEvent::new(
                actor.to_owned(),
                t.action,
                format!("rollout/{}", rollout.id),
                detail,
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        if let Some(to) = t.counted_as {
            metrics::counter!("aviary_rollout_transitions_total", "to" => to).increment(1);
        }
        let mut st = self.state();
        if t.takes_revision {
            st.revision = st.revision.max(next);
        }
        if let Some(d) = st.rollouts.iter_mut().find(|d| d.id == rollout.id) {
            *d = rollout.clone();
        }
        let updates = if t.takes_revision {
            republish(&mut st, &rollout.selector, self.ttl_seconds)
        } else {
            Vec::new()
        };
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(rollout)
    }
}
